#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| guestd_fuzz::jupyter_wire::run(data));
