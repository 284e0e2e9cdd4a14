#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| guestd_fuzz::start_plan::run(data));
