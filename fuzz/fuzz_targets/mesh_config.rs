//! The mesh config file is operator input: any bytes must give a config or an error.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = weft::discovery::file::parse(Path::new("fuzz.yaml"), text);
    }
});
