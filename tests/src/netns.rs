//! Named network namespaces (as created by `ip netns add`) and per-thread setns(2).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::panic;
use std::path::PathBuf;
use std::sync::mpsc;
use std::thread::{self, JoinHandle};

use anyhow::{anyhow, Context, Result};

/// Directory where `ip netns` keeps its namespace bind mounts.
pub const NETNS_DIR: &str = "/run/netns";

/// Path of the bind mount of the named network namespace: /run/netns/<name>.
pub fn netns_path(name: &str) -> PathBuf {
    PathBuf::from(NETNS_DIR).join(name)
}

/// Whether a named network namespace exists (its /run/netns entry is present).
pub fn netns_exists(name: &str) -> bool {
    netns_path(name).exists()
}

/// Opens the named network namespace for setns(2).
pub fn open_netns(name: &str) -> Result<File> {
    let path = netns_path(name);
    File::open(&path)
        .with_context(|| format!("could not open network namespace {}", path.display()))
}

/// Moves the calling thread (only) into the network namespace referred to by `ns`.
pub fn setns_net(ns: &File) -> io::Result<()> {
    // SAFETY: setns only reads the fd and flag; it affects just the calling thread for netns.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `f` on a fresh thread that has joined the named network namespace; returns its value and re-raises its panic.
pub fn in_netns<R, F>(name: &str, f: F) -> Result<R>
where
    R: Send,
    F: FnOnce() -> R + Send,
{
    let ns = open_netns(name)?;
    let thread_name = short_thread_name(name);
    let outcome = thread::scope(|scope| {
        let handle = thread::Builder::new()
            .name(thread_name)
            .spawn_scoped(scope, move || {
                setns_net(&ns)?;
                drop(ns);
                Ok::<R, io::Error>(f())
            })
            .context("could not spawn a thread")?;
        match handle.join() {
            Ok(result) => Ok::<_, anyhow::Error>(result),
            Err(payload) => panic::resume_unwind(payload),
        }
    })?;
    outcome.with_context(|| format!("setns into network namespace {name} failed"))
}

/// Spawns a detached-style thread that first joins the named network namespace, then runs `f`.
///
/// Returns once the thread is inside the namespace (or with the setns error).
/// Threads that `f` spawns inherit the namespace.
pub fn spawn_in_netns<F>(name: &str, thread_name: &str, f: F) -> Result<JoinHandle<()>>
where
    F: FnOnce() + Send + 'static,
{
    let ns = open_netns(name)?;
    let (tx, rx) = mpsc::sync_channel::<io::Result<()>>(1);
    let handle = thread::Builder::new()
        .name(short_thread_name(thread_name))
        .spawn(move || {
            let entered = setns_net(&ns);
            drop(ns);
            let ok = entered.is_ok();
            let _ = tx.send(entered);
            if ok {
                f();
            }
        })
        .with_context(|| format!("could not spawn thread {thread_name}"))?;
    let entered = rx
        .recv()
        .map_err(|_| anyhow!("thread {thread_name} died before entering netns {name}"));
    match entered
        .and_then(|r| r.with_context(|| format!("setns into network namespace {name} failed")))
    {
        Ok(()) => Ok(handle),
        Err(e) => {
            let _ = handle.join();
            Err(e)
        }
    }
}

/// Linux thread names are limited to 15 bytes; keep the tail, which holds the unique part.
fn short_thread_name(name: &str) -> String {
    let bytes = name.as_bytes();
    if bytes.len() <= 15 {
        return name.to_string();
    }
    let mut start = bytes.len() - 15;
    while !name.is_char_boundary(start) {
        start += 1;
    }
    name[start..].to_string()
}
