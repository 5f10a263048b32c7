#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| somna_fuzz::guest_request(data));
