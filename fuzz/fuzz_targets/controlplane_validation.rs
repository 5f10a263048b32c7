#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| somna_fuzz::controlplane_validation(data));
