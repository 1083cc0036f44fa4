//! More clients: extra client network namespaces joined to a sandbox's
//! backends namespace, for tests whose key is the client's network
//! namespace (svclb's `mh`, `sh` and affinity hash the netns cookie).
//!
//! Extra client `i` is the namespace `svclb-<sandbox id>-x<i>` with a veth
//! `veth-c` holding 172.50.0.(100 + i)/24; its peer `vx<i>` sits in the
//! backends namespace without an address, plus a /32 route back to the
//! client, so the backends answer on the right link. Nothing leaves the
//! sandbox: no namespace has a route out of 172.50.0.0/24.

use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::netns;
use crate::sandbox::{Sandbox, CLIENT_VETH, V4_PREFIX_LEN};
use crate::util::{command_line, ip_command, warn};

/// First host number of the extra clients (172.50.0.100).
pub const FIRST_HOST: u8 = 100;
/// At most this many extra clients (172.50.0.100 to .249).
pub const MAX_EXTRA_CLIENTS: usize = 150;

/// Extra client namespaces of one sandbox; all removed on drop.
#[derive(Debug)]
pub struct ExtraClients {
    names: Vec<String>,
    addrs: Vec<Ipv4Addr>,
}

impl ExtraClients {
    /// Creates `count` client namespaces joined to `sandbox`'s backends.
    pub fn new(sandbox: &Sandbox, count: usize) -> Result<ExtraClients> {
        if count > MAX_EXTRA_CLIENTS {
            bail!("at most {MAX_EXTRA_CLIENTS} extra clients fit in 172.50.0.100-249");
        }
        let base = format!("{}{}", crate::sandbox::NAME_PREFIX, sandbox.id());
        let mut clients = ExtraClients {
            names: Vec::with_capacity(count),
            addrs: Vec::with_capacity(count),
        };
        let mut add = String::new();
        for i in 0..count {
            let name = format!("{base}-x{i}");
            add.push_str(&format!("netns add {name}\n"));
            clients.names.push(name);
            clients
                .addrs
                .push(Ipv4Addr::new(172, 50, 0, FIRST_HOST + i as u8));
        }
        // From here on, drop removes whatever was created.
        batch(&[], &add).context("creating the extra client namespaces")?;
        let mut links = String::new();
        for (i, (name, addr)) in clients.names.iter().zip(&clients.addrs).enumerate() {
            links.push_str(&format!(
                "link add vx{i} type veth peer name {CLIENT_VETH} netns {name}\n\
                 link set vx{i} up\n\
                 route add {addr}/32 dev vx{i}\n"
            ));
        }
        batch(&["-n", sandbox.backends_netns()], &links)
            .context("creating the extra clients' veth pairs")?;
        for (name, addr) in clients.names.iter().zip(&clients.addrs) {
            batch(
                &["-n", name],
                &format!(
                    "addr add {addr}/{V4_PREFIX_LEN} dev {CLIENT_VETH}\n\
                     link set {CLIENT_VETH} up\n"
                ),
            )
            .with_context(|| format!("configuring {name}"))?;
        }
        Ok(clients)
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Namespace names, in client order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Client `i`'s address.
    pub fn addr(&self, i: usize) -> Ipv4Addr {
        self.addrs[i]
    }

    /// Runs `f` on a fresh thread inside client `i`'s namespace.
    pub fn in_client<R: Send, F: FnOnce() -> R + Send>(&self, i: usize, f: F) -> R {
        netns::in_netns(&self.names[i], f).unwrap_or_else(|e| panic!("extra client {i}: {e:#}"))
    }
}

impl Drop for ExtraClients {
    fn drop(&mut self) {
        // The veth pairs go with their namespaces.
        let del: String = self
            .names
            .iter()
            .filter(|n| netns::netns_exists(n))
            .map(|n| format!("netns del {n}\n"))
            .collect();
        if !del.is_empty() {
            if let Err(e) = batch(&[], &del) {
                warn(format_args!("removing extra clients: {e:#}"));
            }
        }
    }
}

/// `ip ARGS -batch -` with `commands` on stdin.
fn batch(args: &[&str], commands: &str) -> Result<()> {
    let mut cmd: Command = ip_command();
    cmd.args(args)
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let line = command_line(&cmd);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("could not start `{line}`"))?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(commands.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "`{line}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
