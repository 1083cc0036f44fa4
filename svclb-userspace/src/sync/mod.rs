//! Keeping the desired state: where it comes from and how it is merged.
//!
//! Two sources make it: the config file ([`file`]), whose services given in
//! full are taken as they are, and DNS ([`dns`]), which fills in the
//! services declared by name. svclbd merges them into one
//! [`DesiredState`] and hands it to one [`crate::reconcile::apply`], so a
//! change from either source reaches the maps atomically, as one plan,
//! and a file that does not validate changes nothing.
//!
//! svclb has no control plane of its own: on a Swarm node, Docker's DNS is
//! the source of truth and the file only says what to look up there.

pub mod dns;
pub mod docker;
pub mod file;

use anyhow::Result;

use crate::dataplane::Snapshot;
use crate::model::{Config, DesiredState};
use dns::{Discovery, Refresh};

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
