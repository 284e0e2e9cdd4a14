#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| guestd_fuzz::ndjson_escape::run(data));
