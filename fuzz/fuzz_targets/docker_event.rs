//! The Docker engine's `GET /events`: one event's JSON -> bollard's
//! `EventMessage` -> `docker::wake_of`, what svclbd makes of it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use svclb::sync::docker::{wake_of, Wake};

fuzz_target!(|data: &[u8]| {
    let Ok(event) = serde_json::from_slice::<bollard::models::EventMessage>(data) else {
        return;
    };
    let is_container = event.typ.map(|t| t.to_string()) == Some("container".to_owned());
    match wake_of(event) {
        Some(Wake::Event {
            stopping,
            draining,
            started,
            ..
        }) => {
            // Only a stopping container drains; only containers stop or start.
            assert!(!draining || stopping.is_some());
            assert!(stopping.is_none() || is_container);
            assert!(started.is_none() || is_container);
            assert!(stopping.is_none() || started.is_none());
        }
        Some(other) => panic!("an event made {other:?}"),
        None => {}
    }
});
