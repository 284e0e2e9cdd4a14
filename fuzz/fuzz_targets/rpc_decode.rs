#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| guestd_fuzz::rpc_decode::run(data));
