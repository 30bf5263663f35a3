//! Redis replies (RESP) come from the network: the waypoint's small client
//! must refuse anything malformed or over its bounds without panicking.
#![no_main]

use std::{future::Future, pin::pin, task::Context};

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut input = data;
    let reading = pin!(weft::http::ratelimit::read_reply(&mut input, 0));
    // The bytes are all there: one poll finishes it.
    let _ = reading.poll(&mut Context::from_waker(std::task::Waker::noop()));
});
