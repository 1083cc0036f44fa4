//! svclb-ctl's command line: bytes split at NUL into arguments (any bytes,
//! as argv may hold) -> `ctl::Args::try_parse_from`, the binary's own
//! definitions; errors are rendered as svclb-ctl would print them.
#![no_main]

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;

use clap::Parser;
use libfuzzer_sys::fuzz_target;
use svclb::ctl::Args;

fuzz_target!(|data: &[u8]| {
    let argv = std::iter::once(OsString::from("svclb-ctl")).chain(
        data.split(|&b| b == 0)
            .map(|a| OsString::from_vec(a.to_vec())),
    );
    match Args::try_parse_from(argv) {
        Ok(args) => {
            let _ = format!("{args:?}");
        }
        Err(e) => {
            let _ = e.render().to_string();
        }
    }
});
