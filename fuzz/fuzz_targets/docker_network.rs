//! The Docker engine's `GET /networks/{id}?verbose=true`: JSON -> bollard's
//! `NetworkInspect` -> `docker::services_of_network` (as a resync reads it)
//! -> `docker::merge` with a file's services, after a good view whose
//! services are kept while the new ones are refused.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use svclb::model::{self, ServiceSpec};
use svclb::sync::docker::{merge, services_of_network};

fn view(network: &str, json: &str) -> BTreeMap<String, ServiceSpec> {
    let services = serde_json::from_str(json).unwrap();
    by_name(services_of_network(network, services))
}

fn by_name(specs: Vec<ServiceSpec>) -> BTreeMap<String, ServiceSpec> {
    specs.into_iter().map(|s| (s.name.clone(), s)).collect()
}

fuzz_target!(|data: &[u8]| {
    let Ok(inspect) = serde_json::from_slice::<bollard::models::NetworkInspect>(data) else {
        return;
    };
    // A resync follows only networks with a valid name.
    let network = inspect.name.unwrap_or_default();
    if model::check_network(&network).is_err() {
        return;
    }
    let statics = svclb::config::parse_str(
        "[[service]]\nname = \"db\"\nvip = \"10.0.0.9\"\nmark = 300\nbackends = [\"10.0.0.7\"]\n",
        "statics",
    )
    .unwrap()
    .static_state();
    let (mut refused, mut last_good) = (BTreeMap::new(), BTreeMap::new());
    let good = view(
        &network,
        r#"{"api": {"VIP": "10.0.3.2/24", "LocalLBIndex": 257,
                    "Tasks": [{"EndpointIP": "10.0.3.5"}, {"EndpointIP": "10.0.3.6"}]}}"#,
    );
    let before = merge(&statics, &good, &mut refused, &mut last_good);
    model::check_state(&before).expect("the good view makes a valid state");

    let found = by_name(services_of_network(
        &network,
        inspect.services.unwrap_or_default(),
    ));
    let after = merge(&statics, &found, &mut refused, &mut last_good);
    if let Err(e) = model::check_state(&after) {
        panic!("the engine's view made an invalid state: {e}\n{after:#?}");
    }
    for (name, why) in &refused {
        let now: Vec<&ServiceSpec> = after.services.iter().filter(|s| &s.name == name).collect();
        match good.get(name) {
            // Refused: its last good version, unless that conflicts now.
            Some(old) if now.len() == 1 => assert_eq!(now[0], old, "{why}"),
            _ => assert!(now.is_empty(), "refused ({why}) yet applied"),
        }
    }
    assert_eq!(
        after.services[0], statics.services[0],
        "the file's service stays"
    );
});
