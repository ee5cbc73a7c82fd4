//! The valve: the only code that touches BPF maps.
