//! The Docker source's part of the Control plane section.

use std::fmt::Write as _;

use super::thousands;
use crate::docker::DockerData;

/// The Docker source's figures: a paragraph and a table.
pub(super) fn docker_markdown(md: &mut String, d: &DockerData) {
    let _ = writeln!(
        md,
        "\n### The Docker source: from a Docker event to new connects\n\n\
         `svclbd --docker` follows an engine serving one swarm network with N services (the \
         test harness's fake engine, tests/src/fake_swarm.rs: a real swarm with that many \
         services needs as many containers). It answers the Engine API svclbd reads \
         (`/version`, `/networks`, `/networks/ID?verbose=true` with each service's VIP, \
         LocalLBIndex and tasks, `/containers/json`, a streamed `/events`) on a Unix socket. \
         Each change replaces the probe service's task with the other identity server and \
         sends one `container start` event stamped with the time; the figure runs from that \
         stamp to the end of the first connect, from the probe in the containers' cgroup, \
         that reached the new task. svclbd's own `event_to_maps_ms` (its log; the \
         `svclb_docker_event_to_maps_seconds` metric) runs from the event's `timeNano` to \
         the maps written; it logs one only when the event's own resync changed the maps, and \
         counts from the earliest event not yet followed by a resync. svclbd polls the engine \
         every second besides the events (its default): a poll may take the change before \
         the event's resync, or delay it; the events-only rows (`--docker-poll 1h`) show the \
         event path alone. The targets are judged on the default rows. p99 is the nearest \
         rank (with fewer than 100 changes, the largest).\n"
    );
    let _ = writeln!(
        md,
        "| services on the network | svclbd follows | changes | ms until visible: median | p99 | min–max | svclbd event-to-maps ms: median | p99 |\n| --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    for f in &d.figures {
        let Some(v) = &f.visible_ms else {
            let _ = writeln!(
                md,
                "| {} | {} | {} | failed: {} | | | | |",
                thousands(f.services),
                crate::docker::poll_text(f.poll.as_deref()),
                f.changes,
                f.error.as_deref().unwrap_or("-")
            );
            continue;
        };
        let opt = |x: Option<f64>| x.map_or_else(|| "–".into(), |x| format!("{x:.2}"));
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.2} | {} | {:.2}–{:.2} | {} | {} |",
            thousands(f.services),
            crate::docker::poll_text(f.poll.as_deref()),
            f.changes,
            v.median,
            opt(f.visible_p99_ms),
            v.min,
            v.max,
            opt(f.svclbd_ms.map(|s| s.median)),
            opt(f.svclbd_p99_ms)
        );
    }
}
