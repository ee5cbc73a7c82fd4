#![no_main]
// Thin: the target itself is `tollgate_fuzz::nostr_event` (also replayed on stable in CI).
libfuzzer_sys::fuzz_target!(|data: &[u8]| tollgate_fuzz::nostr_event(data));
