//! TollGate protocol events.
