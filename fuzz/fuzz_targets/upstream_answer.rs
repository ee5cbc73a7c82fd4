#![no_main]
// Thin: the target itself is `tollgate_fuzz::upstream_answer` (also replayed on stable in CI).
libfuzzer_sys::fuzz_target!(|data: &[u8]| tollgate_fuzz::upstream_answer(data));
