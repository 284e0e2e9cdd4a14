#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| guestd_fuzz::sign::run(data));
