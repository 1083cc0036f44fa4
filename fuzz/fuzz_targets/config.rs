//! The config file: bytes -> `config::parse_bytes` (TOML, then the file's
//! validation) -> what svclbd runs before its first map write: the plan,
//! against empty maps.
#![no_main]

use libfuzzer_sys::fuzz_target;
use svclb::dataplane::{Capacity, Snapshot};
use svclb::{config, model, reconcile};

fuzz_target!(|data: &[u8]| {
    let Ok(parsed) = config::parse_bytes(data, "fuzz.toml") else {
        return;
    };
    let state = parsed.static_state();
    // What the file's validation accepts keeps the model's rules...
    if let Err(e) = model::check_state(&state) {
        panic!("accepted, yet not a valid state: {e}\n{state:#?}");
    }
    // ...and is read back the same once written out in the file format.
    let text = toml::to_string(&state).expect("a desired state serializes");
    let again = config::parse_str(&text, "written out")
        .unwrap_or_else(|e| panic!("its own rendering is refused: {e}\n{text}"));
    assert_eq!(again.services, parsed.services, "{text}");
    let capacity = Capacity {
        services: svclb_common::DEFAULT_MAX_SERVICES,
        backends: svclb_common::DEFAULT_MAX_BACKENDS,
        slots: svclb::loader::Capacities::default().slots(),
    };
    let _ = reconcile::plan(&Snapshot::default(), &state, capacity);
});
