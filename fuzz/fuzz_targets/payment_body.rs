#![no_main]
// Thin: the target itself is `tollgate_fuzz::payment_body` (also replayed on stable in CI).
libfuzzer_sys::fuzz_target!(|data: &[u8]| tollgate_fuzz::payment_body(data));
