//! Keeping the desired state: where it comes from, how it is merged, and
//! the one transaction that takes it to the maps.
//!
//! Three sources make it: the config file ([`file`]), whose services given
//! in full are taken as they are; Docker ([`docker`], `svclbd --docker`);
//! and DNS ([`dns`]), which fills in the services declared by name.
//! [`compose`] merges them into one [`DesiredState`], and [`commit`] takes
//! it to the maps: planned whole (refused before any write when it cannot
//! be applied), written in order, rolled back when a write fails half-way,
//! then the sockets of backends that left are ended. svclbd's start-up,
//! its reloads, its Docker changes and `svclb-ctl apply` all go through
//! [`commit`] (or [`commit_backends`], its incremental path), so a file
//! that does not validate changes nothing and no change is left half-made.
//!
//! svclb has no control plane of its own: on a Swarm node, Docker's DNS is
//! the source of truth and the file only says what to look up there.

pub mod dns;
pub mod docker;
pub mod file;

use anyhow::Result;

use crate::dataplane::{Dataplane, Snapshot};
use crate::model::{Config, DesiredState, ServiceSpec};
use crate::reconcile::{self, Plan};
use crate::terminate::{self, Ended};
use dns::{Discovery, Refresh};
use docker::DockerSync;

/// The desired state now: the file's services plus one round of DNS
/// answers, starting from what `snapshot` holds for the discovered
/// services (so a name that cannot be resolved keeps its current set).
/// Returns the discovery too, for svclbd to keep refreshing.
pub async fn desired_now(
    config: &Config,
    snapshot: &Snapshot,
) -> Result<(DesiredState, Discovery)> {
    let mut discovery = Discovery::new(&config.discovered, &config.dns)?;
    discovery.adopt(snapshot);
    discovery.refresh(Refresh::All).await;
    let desired = discovery.compose(&config.static_state());
    Ok((desired, discovery))
}

/// The whole desired state: the file's services, then Docker's (those that
/// conflict with the file's refused), then DNS's.
pub fn compose(
    config: &Config,
    docker: Option<&mut DockerSync>,
    discovery: &mut Discovery,
) -> DesiredState {
    let statics = config.static_state();
    let with_docker = match docker {
        Some(d) => d.compose(&statics),
        None => statics,
    };
    if discovery.is_empty() {
        // Nothing to fill in (as with --docker alone): no copy of it all.
        return with_docker;
    }
    discovery.compose(&with_docker)
}

/// A change that reached the maps.
pub struct Committed {
    pub plan: Plan,
    /// The sockets ended, per backend that left.
    pub ended: Vec<Ended>,
}

/// Takes `desired` to the maps, all of it or (on any error) none of it: see
/// the module doc. `spare` may clear a departing backend's `end_sockets`
/// before sockets are ended (a task stopping gracefully keeps them).
pub fn commit(
    dp: &mut Dataplane,
    desired: &DesiredState,
    spare: impl FnOnce(&mut Plan),
) -> Result<Committed> {
    let plan = reconcile::apply(dp, desired).inspect_err(|_| failed())?;
    Ok(finish(dp, plan, spare))
}

/// [`commit`] for services whose backends alone changed (the incremental
/// path, [`reconcile::plan_backends`]); `Ok(None)`, having written
/// nothing, when they do not qualify: [`commit`] the whole state then.
pub fn commit_backends(
    dp: &mut Dataplane,
    specs: &[&ServiceSpec],
    spare: impl FnOnce(&mut Plan),
) -> Result<Option<Committed>> {
    let plan = reconcile::apply_backends(dp, specs).inspect_err(|_| failed())?;
    Ok(plan.map(|plan| finish(dp, plan, spare)))
}

/// Every refused change is counted (`svclb_faults_total{kind="apply_failed"}`).
pub fn failed() {
    crate::health::count(crate::health::Fault::ApplyFailed);
}

/// Changes that reached the maps (`svclb_changes_applied_total`): counted
/// once every write of one is done, so a watcher that sees it move knows
/// new connects follow the change.
static APPLIED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// `svclb_changes_applied_total` and `svclb_map_writes_total` in
/// Prometheus's text format.
pub fn render_applied() -> String {
    format!(
        "# HELP svclb_changes_applied_total Changes svclbd wrote to the maps (each whole).\n\
         # TYPE svclb_changes_applied_total counter\n\
         svclb_changes_applied_total {}\n\
         # HELP svclb_map_writes_total Map write syscalls svclbd made for its applies (a batch counts once).\n\
         # TYPE svclb_map_writes_total counter\n\
         svclb_map_writes_total {}\n",
        APPLIED.load(std::sync::atomic::Ordering::Relaxed),
        crate::dataplane::map_writes()
    )
}

fn finish(dp: &Dataplane, mut plan: Plan, spare: impl FnOnce(&mut Plan)) -> Committed {
    if !plan.is_empty() {
        APPLIED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    spare(&mut plan);
    let ended = terminate::after_apply(dp.pins(), &plan);
    Committed { plan, ended }
}
