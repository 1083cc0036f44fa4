//! DNS answers: two DNS messages (the first for `api`, its VIPs; the rest
//! for `tasks.api` and `tasks.web`, the tasks), each parsed by
//! hickory-proto -> `dns::answer_of` on its answer records -> the
//! discovery's names -> `Discovery::compose` beside a file's services.
//! Input: a 2-byte big-endian length, the first message, the second.
#![no_main]

use std::collections::BTreeMap;

use hickory_proto::op::Message;
use libfuzzer_sys::fuzz_target;
use svclb::model::{self, DesiredState, DiscoveredSpec, DnsSettings, ServiceSpec};
use svclb::sync::dns::{answer_of, Answer, Discovery, Role};
use svclb_common::Scheduler;

fn answer(bytes: &[u8]) -> Option<Answer> {
    let message = Message::from_vec(bytes).ok()?;
    Some(answer_of(message.answers()))
}

fn addrs(list: &[&str]) -> Answer {
    Answer::Addrs(
        list.iter().map(|a| a.parse().unwrap()).collect(),
        std::time::Duration::from_secs(5),
    )
}

fn by_name(state: &DesiredState, name: &str) -> Vec<ServiceSpec> {
    state
        .services
        .iter()
        .filter(|s| s.name == name)
        .cloned()
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let (Some(len), Some(rest)) = (data.get(..2), data.get(2..)) else {
        return;
    };
    let len = usize::from(u16::from_be_bytes([len[0], len[1]])).min(rest.len());
    let (vips, tasks) = rest.split_at(len);

    let statics = svclb::config::parse_str(
        "[[service]]\nname = \"db\"\nvip = \"10.0.0.9\"\nmark = 0x200\nbackends = [\"10.0.0.7\"]\n",
        "statics",
    )
    .unwrap()
    .static_state();
    let spec = |name: &str, vip: Option<&str>| DiscoveredSpec {
        name: name.to_owned(),
        vip: vip.map(|v| v.parse().unwrap()),
        mark: vip.map(|_| 0x201),
        scheduler: Scheduler::Rr,
        terminate_on_removal: true,
    };
    let settings = DnsSettings {
        nameservers: vec!["127.0.0.1:53".parse().unwrap()],
        ..DnsSettings::default()
    };
    let mut discovery = Discovery::new(
        &[spec("api", None), spec("web", Some("10.0.0.20"))],
        &settings,
    )
    .unwrap();

    // A good answer first: the last good state to keep.
    discovery.record_answer("api", Role::Vips, addrs(&["10.0.1.2", "fd00::2"]));
    discovery.record_answer("api", Role::Tasks, addrs(&["10.0.1.5", "fd00::5"]));
    discovery.record_answer("web", Role::Tasks, addrs(&["10.0.2.5"]));
    let good = discovery.compose(&statics);
    model::check_state(&good).expect("the good answers make a valid state");

    if let Some(a) = answer(vips) {
        discovery.record_answer("api", Role::Vips, a);
    }
    if let Some(a) = answer(tasks) {
        discovery.record_answer("api", Role::Tasks, a.clone());
        discovery.record_answer("web", Role::Tasks, a);
    }
    let now = discovery.compose(&statics);
    if let Err(e) = model::check_state(&now) {
        panic!("DNS answers made an invalid state: {e}\n{now:#?}");
    }
    let status: BTreeMap<String, Option<String>> = discovery
        .status()
        .into_iter()
        .map(|s| (s.service, s.rejected))
        .collect();
    for (service, rejected) in &status {
        if rejected.is_some() {
            assert_eq!(
                by_name(&now, service),
                by_name(&good, service),
                "refused ({rejected:?}) yet not the last good set"
            );
        }
        for s in by_name(&now, service) {
            assert!(s.backends.len() <= model::MAX_BACKENDS_PER_SERVICE);
        }
    }
    assert!(by_name(&now, "api").len() <= svclb::sync::dns::MAX_VIPS_PER_NAME);
    assert_eq!(by_name(&now, "db"), by_name(&good, "db"));
});
