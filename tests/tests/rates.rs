//! IPVS's rate estimator, end to end with the real programs in the real
//! kernel: the rates follow a steady load and go stale without svclbd.
//! Run as root, serially (`cargo xtask test`).
//!
//! All traffic stays in the sandbox namespaces.

mod common;

use std::time::{Duration, Instant};

use common::stats::*;
use common::*;
use svclb::rates::monotonic_ns;
use svclb_tests::PinDir;

/// When svclbd last sampled the rates (from the pinned estimator map).
fn last_sample_ns(pins: &PinDir) -> u64 {
    let dp = svclb::dataplane::Dataplane::open(&svclb::pins::PinDir::new(pins.path())).unwrap();
    dp.last_sampled().expect("svclbd has sampled")
}

/// IPVS's estimator (ip_vs_est.c), written out independently of svclb's:
/// the CPS it reports after samples of the connection counter `at` the
/// given times, every 2 s: rate = delta << 9, avg += (rate - avg) >> 2,
/// shown as (avg + 0x1FF) >> 10.
fn ipvs_cps(connects_ns: &[u64], samples_ns: &[u64]) -> u64 {
    let mut avg: i64 = 0;
    let mut last = None;
    for t in samples_ns {
        let now = connects_ns.iter().filter(|c| *c < t).count() as i64;
        if let Some(last) = last {
            let rate = (now - last) << 9;
            avg += (rate - avg) >> 2;
        }
        last = Some(now);
    }
    (avg as u64 + 0x1FF) >> 10
}

/// A steady connect rate through the VIP: one connection (connect,
/// identity line, close) every 8 ms for `run_for`: each connect's time, and
/// how long it took.
fn steady_load(fx: &ApiFixture, run_for: Duration) -> (Vec<u64>, Duration) {
    let period = Duration::from_millis(8);
    let _guard = fx.sandbox.enter_cgroup().unwrap();
    fx.sandbox.in_client(|| {
        let start = Instant::now();
        let mut connects = Vec::new();
        while start.elapsed() < run_for {
            connects.push(monotonic_ns());
            svclb_tests::tcp_identity(addr(VIP, PORT), TIMEOUT).unwrap();
            let next = start + period * connects.len() as u32;
            if let Some(wait) = next.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        (connects, start.elapsed())
    })
}

/// `svclb-ctl rate --json` and the time of the sample it shows (read again
/// if svclbd sampled in between): (report, stderr, sample time).
fn rates_at_a_sample(pins: &PinDir) -> (serde_json::Value, String, u64) {
    loop {
        let before = last_sample_ns(pins);
        let (report, stderr) = rate_json(pins);
        if last_sample_ns(pins) == before {
            break (report, stderr, before);
        }
    }
}

#[test]
fn rates_follow_a_steady_load_and_go_stale_without_svclbd() {
    let mut fx = ApiFixture::start();
    let (connects, elapsed) = steady_load(&fx, Duration::from_secs(7));
    let (report, stderr, sampled) = rates_at_a_sample(&fx.pins);
    let made = connects.len();
    let measured = made as f64 / elapsed.as_secs_f64();
    let api = service(&report, "api");
    let [cps, in_pps, out_pps, in_bps, out_bps] = rates_of(api);
    // svclbd samples every 2 s: the samples that saw the load.
    let samples: Vec<u64> = (0..8).rev().map(|k| sampled - k * 2_000_000_000).collect();
    assert!(
        samples[0] < connects[0],
        "the samples reach back before the load"
    );
    let expected = ipvs_cps(&connects, &samples);
    eprintln!(
        "{made} connections in {elapsed:?}: {measured:.1}/s; svclb-ctl rate: CPS {cps} (IPVS's estimator on the connect times: {expected}) InPPS {in_pps} OutPPS {out_pps} InBPS {in_bps} OutBPS {out_bps}"
    );
    assert!(
        stderr.is_empty(),
        "no staleness warning while svclbd samples: {stderr}"
    );
    // What IPVS would show for these connects, give or take the connects
    // that fell on a sample's boundary (a late tick moves a few).
    assert!(
        cps.abs_diff(expected) <= 2.max(expected / 20),
        "CPS {cps}, IPVS's estimator gives {expected} for the same connects"
    );
    // And plausibly the load's rate: the EWMA (1/4 per 2 s sample) has
    // seen at least two full samples of it (0.44 or more of the rate),
    // and cannot exceed it but for jitter.
    let cps = cps as f64;
    assert!(
        cps >= 0.4 * measured && cps <= 1.2 * measured,
        "CPS {cps} is not within 0.4x-1.2x of the measured {measured:.1}/s"
    );
    // The packet and byte rates are those of the same connections: their
    // ratios to CPS match the counters' ratios to Conns.
    let totals = counters_of(api);
    for (i, rate) in [(1, in_pps), (2, out_pps), (3, in_bps), (4, out_bps)] {
        let per_conn_rate = rate as f64 / cps;
        let per_conn = totals[i] as f64 / totals[0] as f64;
        assert!(
            (per_conn_rate / per_conn - 1.0).abs() < 0.3,
            "rate column {i}: {per_conn_rate:.1} per connection, the counters say {per_conn:.1}"
        );
    }
    // The service's rate is its backends' sum (give or take the rounding).
    let backends_cps: u64 = api["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| rates_of(b)[0])
        .sum();
    assert!(
        backends_cps.abs_diff(cps as u64) <= 2,
        "{backends_cps} vs {cps}"
    );

    // Without svclbd the pinned estimates stay readable, and once they are
    // more than 6 s old svclb-ctl says that nobody is sampling them.
    let status = fx.daemon.take().unwrap().stop().unwrap();
    assert!(status.success());
    let stopped = Instant::now();
    std::thread::sleep(Duration::from_millis(6500));
    let (after, stderr) = rate_json(&fx.pins);
    assert!(
        stderr.contains("svclbd is not sampling them"),
        "stale rates are flagged: {stderr:?}"
    );
    assert!(stopped.elapsed() < Duration::from_secs(10));
    assert!(
        rates_of(service(&after, "api"))[0] > 0,
        "the last estimate stays readable: {after}"
    );
}

/// svclbd reads only the counters that the data plane flagged as moved; a
/// backend that went idle has no flag, and its estimate must still decay
/// sample by sample as IPVS's does.
#[test]
fn rates_decay_as_ipvs_once_the_load_stops() {
    let fx = ApiFixture::start();
    let (connects, _) = steady_load(&fx, Duration::from_secs(5));
    // Three to four samples with no traffic at all.
    std::thread::sleep(Duration::from_millis(7000));
    let (report, _, sampled) = rates_at_a_sample(&fx.pins);
    let api = service(&report, "api");
    let cps = rates_of(api)[0];
    let samples: Vec<u64> = (0..10).rev().map(|k| sampled - k * 2_000_000_000).collect();
    assert!(
        samples[0] < connects[0],
        "the samples reach back before the load"
    );
    let expected = ipvs_cps(&connects, &samples);
    let at_the_end = ipvs_cps(&connects, &samples[..7]);
    eprintln!(
        "{} connections; CPS {cps}, IPVS's estimator {expected} now, {at_the_end} when the load stopped",
        connects.len()
    );
    assert!(
        expected < at_the_end && expected > 0,
        "the load stopped samples ago: {expected} vs {at_the_end}"
    );
    assert!(
        cps.abs_diff(expected) <= 2.max(expected / 20),
        "CPS {cps} after the load stopped, IPVS's estimator gives {expected}"
    );
    // Nothing moved the packet counters either: all decay together.
    for (i, rate) in rates_of(api).into_iter().enumerate().skip(1) {
        assert!(rate > 0, "rate column {i} still shows the decaying load");
    }
}
