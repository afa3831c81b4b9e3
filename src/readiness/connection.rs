//! Connection status per site: `up`, `down` or `unknown`, with the cause and since when.
//!
//! The evidence is the link state of the site's uplinks (the inventory's `uplinks`, from
//! interface samples' `ifOperStatus`) and its probe rounds (a round is answered when it lost
//! less than all of its packets). In event-time order, at every closed window:
//!
//! 0. `down`, cause `link_down`: every uplink's latest sample says its link is down; the outage
//!    starts at that sample. When a link comes back, the outage ends then, unless probe rounds
//!    are still being lost (it goes on as `unreachable`) or too few were answered yet.
//! 1. `down`, cause `unreachable`: the last `down_after_lost_rounds` rounds were all lost. The
//!    outage starts at the first lost round of that run.
//! 2. A down site comes back `up` only after `up_after_answered_rounds` answered rounds in a row
//!    (hysteresis: one lucky round does not end an outage); the outage ends at the first of them.
//! 3. `up` otherwise, as soon as a round is answered (`answered`), or for a site without
//!    probe rounds, as soon as an uplink reports its link up (`link_up`).
//! 4. `unknown` when nothing came for the freshness limit (`freshness_windows` windows):
//!    silence is not an outage, it may be the probe or the collector that stopped.
//!
//! Then, along the inventory's hierarchy (`parent_id`): a site that is down while a site above
//! it is down too is `upstream_down`, naming the highest down site of the chain as the cause —
//! "7 of 20 communes of Mèo Vạc are down because Mèo Vạc is" is one alert, not 20. An outage
//! that began with its upstream's keeps that cause until it ends.

use serde::{Deserialize, Serialize};

/// A site's connection state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Up,
    Down,
    #[default]
    Unknown,
}

impl State {
    pub const ALL: [State; 3] = [State::Up, State::Down, State::Unknown];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Up => "up",
            State::Down => "down",
            State::Unknown => "unknown",
        }
    }
}

/// Why a site is in its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// Up: its probe rounds are answered.
    Answered,
    /// Up: an uplink reports its link up (and no probe says otherwise).
    LinkUp,
    /// Down: every uplink reports its link down (`ifOperStatus`).
    LinkDown,
    /// Down: its own probe rounds are lost.
    Unreachable,
    /// Down with a site above it (see [`Status::upstream`]).
    UpstreamDown,
    /// Unknown: no probe round for the freshness limit (or none yet).
    #[default]
    NoTelemetry,
}

impl Cause {
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Answered => "answered",
            Cause::LinkUp => "link_up",
            Cause::LinkDown => "link_down",
            Cause::Unreachable => "unreachable",
            Cause::UpstreamDown => "upstream_down",
            Cause::NoTelemetry => "no_telemetry",
        }
    }
}

/// A site's connection status.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Status {
    pub state: State,
    pub cause: Cause,
    /// Event time the state began (ns): for `down`, the outage's start.
    pub since_ns: Option<i64>,
    /// For `upstream_down`: the site above whose outage this one is part of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
}

/// The hysteresis of the connection status (policy file, `connection:`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConnectionPolicy {
    /// Lost probe rounds in a row that make a site down.
    pub down_after_lost_rounds: u32,
    /// Answered probe rounds in a row that bring a down site back up.
    pub up_after_answered_rounds: u32,
}

impl Default for ConnectionPolicy {
    fn default() -> Self {
        Self { down_after_lost_rounds: 3, up_after_answered_rounds: 2 }
    }
}

impl ConnectionPolicy {
    pub fn validate(&self) -> Result<(), String> {
        for (name, v) in
            [("down_after_lost_rounds", self.down_after_lost_rounds), ("up_after_answered_rounds", self.up_after_answered_rounds)]
        {
            if !(1..=1000).contains(&v) {
                return Err(format!("connection.{name}: must be between 1 and 1000 (got {v})"));
            }
        }
        Ok(())
    }
}

/// One site's evidence and status.
#[derive(Debug, Default)]
pub struct Tracker {
    /// Evidence not yet taken into account, with its event time.
    pending: Vec<(i64, Evidence)>,
    /// The latest link state of each uplink and its event time (none: not reported).
    links: Vec<Option<(i64, bool)>>,
    last_link_ns: Option<i64>,
    lost_run: u32,
    lost_since: i64,
    answered_run: u32,
    answered_since: i64,
    last_round_ns: Option<i64>,
    status: Status,
    /// Whether the current outage began with its upstream's (its cause then stays
    /// `upstream_down` to its end).
    began_upstream: bool,
    /// Up and down time in the current calendar month (UTC).
    month: Month,
}

/// Time in each state since the start of a calendar month (or of the process, if later and
/// the history had none of it).
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Month {
    /// First day of the month, days since the epoch.
    pub first_day: i64,
    pub up_secs: f64,
    pub down_secs: f64,
    /// Windows ending at or before this (ns) are counted already: read back from the history
    /// at start, so a window evaluated again after a restart is not counted twice.
    pub counted_through_ns: i64,
}

impl Month {
    fn add(&mut self, state: State, secs: f64) {
        match state {
            State::Up => self.up_secs += secs,
            State::Down => self.down_secs += secs,
            State::Unknown => {}
        }
    }

    /// Up time over up and down time (unknown time counts for neither); `None` before any.
    pub fn availability(&self) -> Option<f64> {
        let known = self.up_secs + self.down_secs;
        (known > 0.0).then(|| self.up_secs / known)
    }
}

/// Days since the epoch of the first day of the month holding `t_ns` (UTC).
fn month_first_day(t_ns: i64) -> i64 {
    use chrono::Datelike;
    let date = chrono::DateTime::from_timestamp_nanos(t_ns).date_naive();
    let first = date.with_day(1).expect("every month has a first day");
    first.signed_duration_since(chrono::DateTime::UNIX_EPOCH.date_naive()).num_days()
}

/// One piece of evidence about a site's connection.
#[derive(Debug, Clone, Copy)]
enum Evidence {
    /// A probe round: answered (some packets came back) or lost.
    Round { answered: bool },
    /// A sample of the link state of the site's `uplink`-th uplink.
    Link { uplink: usize, up: bool },
}

impl Tracker {
    /// Takes one probe round (any order: evidence is sorted by event time at evaluation).
    pub fn observe_round(&mut self, t_ns: i64, loss_ratio: f64) {
        self.pending.push((t_ns, Evidence::Round { answered: loss_ratio < 1.0 }));
    }

    /// Takes one link-state sample of the site's `uplink`-th uplink (inventory order).
    pub fn observe_link(&mut self, t_ns: i64, uplink: usize, up: bool) {
        self.pending.push((t_ns, Evidence::Link { uplink, up }));
    }

    pub fn status(&self) -> &Status {
        &self.status
    }

    pub fn month(&self) -> &Month {
        &self.month
    }

    /// Starts from a month read back from the history (the process restarted within it).
    pub fn resume_month(&mut self, month: Month) {
        self.month = month;
    }

    fn set(&mut self, state: State, cause: Cause, since_ns: i64) {
        self.status = Status { state, cause, since_ns: Some(since_ns), upstream: None };
    }

    /// Takes the evidence before `end_ns` in event-time order and updates the site's own status
    /// (the hierarchy is applied afterwards by [`attribute_upstream`]). `stale_ns`: the
    /// freshness limit. `planned`: the window is in planned maintenance, its time counts for
    /// neither up nor down.
    pub fn evaluate(&mut self, policy: &ConnectionPolicy, start_ns: i64, end_ns: i64, stale_ns: i64, planned: bool) {
        self.pending.sort_by_key(|(t, _)| *t);
        let due = self.pending.partition_point(|(t, _)| *t < end_ns);
        let evidence: Vec<(i64, Evidence)> = self.pending.drain(..due).collect();
        for (t, e) in evidence {
            let answered = match e {
                Evidence::Round { answered } => {
                    self.last_round_ns = Some(self.last_round_ns.map_or(t, |l| l.max(t)));
                    if answered {
                        if self.answered_run == 0 {
                            self.answered_since = t;
                        }
                        self.answered_run += 1;
                        self.lost_run = 0;
                    } else {
                        if self.lost_run == 0 {
                            self.lost_since = t;
                        }
                        self.lost_run += 1;
                        self.answered_run = 0;
                    }
                    Some(answered)
                }
                Evidence::Link { uplink, up } => {
                    self.last_link_ns = Some(self.last_link_ns.map_or(t, |l| l.max(t)));
                    if self.links.len() <= uplink {
                        self.links.resize(uplink + 1, None);
                    }
                    if self.links[uplink].is_none_or(|(lt, _)| lt <= t) {
                        self.links[uplink] = Some((t, up));
                    }
                    None
                }
            };
            self.step(policy, t, answered, stale_ns);
        }
        let newest = self.last_round_ns.max(self.last_link_ns);
        let silent = newest.is_none_or(|t| end_ns - t >= stale_ns);
        if silent && self.status.state != State::Unknown {
            self.set(State::Unknown, Cause::NoTelemetry, end_ns);
            self.lost_run = 0;
            self.answered_run = 0;
            self.links.clear();
        }
        if !planned {
            self.count_window(start_ns, end_ns);
        }
    }

    /// The status after one piece of evidence at `t` (`answered`: a probe round's outcome).
    /// Precedence: every uplink reported down → `link_down`; else the probe rounds' rules. A
    /// link state older than the freshness limit says nothing (its collector may have stopped).
    fn step(&mut self, policy: &ConnectionPolicy, t: i64, answered: Option<bool>, stale_ns: i64) {
        let down = self.status.state == State::Down;
        let since = if down { self.status.since_ns.unwrap_or(t) } else { t };
        let fresh = |l: &Option<(i64, bool)>| l.filter(|(lt, _)| t - lt < stale_ns).map(|(_, up)| up);
        let links_down = !self.links.is_empty() && self.links.iter().all(|l| fresh(l) == Some(false));
        let any_link_up = self.links.iter().any(|l| fresh(l) == Some(true));
        let probed = self.last_round_ns.is_some_and(|r| t - r < stale_ns);
        if links_down {
            if self.status.cause != Cause::LinkDown || !down {
                self.set(State::Down, Cause::LinkDown, since);
            }
        } else if down && self.status.cause == Cause::LinkDown {
            // The link is back: the outage goes on while the probes still say so.
            if probed && self.answered_run < policy.up_after_answered_rounds {
                self.set(State::Down, Cause::Unreachable, since);
            } else {
                self.set(State::Up, Cause::LinkUp, t);
            }
        } else if self.lost_run >= policy.down_after_lost_rounds && !down {
            self.set(State::Down, Cause::Unreachable, self.lost_since);
        } else if answered == Some(true) && (!down || self.answered_run >= policy.up_after_answered_rounds) {
            if self.status.state != State::Up {
                self.set(State::Up, Cause::Answered, self.answered_since);
            }
        } else if answered.is_none() && any_link_up && self.status.state == State::Unknown && !probed {
            // A site known by its uplinks alone.
            self.set(State::Up, Cause::LinkUp, t);
        }
    }

    /// Counts the window `[start, end)` in the month's up or down time by the state it closed
    /// in, as the `availability_daily` SQL view counts the `readiness` table's rows, so the
    /// gauge and SQL agree. (An outage row's duration is longer by its detection time: its start
    /// is the first lost round, its first window closed up.)
    fn count_window(&mut self, start_ns: i64, end_ns: i64) {
        let first_day = month_first_day(start_ns);
        if first_day != self.month.first_day {
            self.month = Month { first_day, ..Month::default() };
        } else if end_ns <= self.month.counted_through_ns {
            return;
        }
        self.month.add(self.status.state, (end_ns - start_ns) as f64 / 1e9);
    }

    /// Sets the hierarchy's verdict on a down site: part of the outage of `upstream` (whose
    /// outage began at `upstream_since`), or its own. `slack_ns`: how much later than this
    /// site's outage its upstream's may begin and still count as where it began (probe rounds
    /// to different sites are not simultaneous).
    fn set_upstream(&mut self, upstream: Option<(String, Option<i64>)>, slack_ns: i64) {
        // Its own uplink down is its own cause, whatever is down above it.
        if self.status.state != State::Down || self.status.cause == Cause::LinkDown {
            return;
        }
        match upstream {
            Some((u, upstream_since)) => {
                if self.status.cause != Cause::UpstreamDown {
                    let own = self.status.since_ns.unwrap_or(i64::MAX);
                    self.began_upstream = upstream_since.is_some_and(|t| t <= own.saturating_add(slack_ns));
                }
                self.status.cause = Cause::UpstreamDown;
                self.status.upstream = Some(u);
            }
            // An outage that began with its upstream's keeps that cause to its end (its sites
            // come back a few rounds after it); one that began on its own is its own again.
            None if self.status.cause == Cause::UpstreamDown && self.began_upstream => {}
            None => {
                self.status.cause = Cause::Unreachable;
                self.status.upstream = None;
            }
        }
    }
}

/// For every down site, the highest down site above it (following `parent`), if any; applied
/// in place. `parent(i)`: the index of site `i`'s parent; `id(i)`: its id. Sites not judged
/// here (scale-out) are never down here, so never anyone's upstream. `slack_ns`: see
/// [`Tracker::set_upstream`] (one window).
pub fn attribute_upstream(trackers: &mut [Tracker], parent: impl Fn(usize) -> Option<usize>, id: impl Fn(usize) -> String, slack_ns: i64) {
    let down: Vec<bool> = trackers.iter().map(|t| t.status.state == State::Down).collect();
    for i in 0..trackers.len() {
        if !down[i] {
            continue;
        }
        let mut highest = None;
        let mut at = parent(i);
        // Bounded by the number of sites: the inventory refuses cycles, but a bad parent map
        // must not hang the pipeline.
        for _ in 0..trackers.len() {
            let Some(p) = at else { break };
            if down[p] {
                highest = Some(p);
            }
            at = parent(p);
        }
        let upstream = highest.map(|p| (id(p), trackers[p].status.since_ns));
        trackers[i].set_upstream(upstream, slack_ns);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1_000_000_000;
    const WINDOW: i64 = 10 * S;
    const STALE: i64 = 2 * WINDOW;

    /// Runs rounds every 5 s (`lost[k]`: round k lost) through evaluations every window; returns
    /// the status after each window.
    fn run(tracker: &mut Tracker, t0: i64, lost: &[bool]) -> Vec<Status> {
        let policy = ConnectionPolicy::default();
        for (k, l) in lost.iter().enumerate() {
            tracker.observe_round(t0 + k as i64 * 5 * S, if *l { 1.0 } else { 0.1 });
        }
        let windows = (lost.len() as i64 * 5 * S + WINDOW - 1) / WINDOW;
        (0..windows)
            .map(|w| {
                tracker.evaluate(&policy, t0 + w * WINDOW, t0 + (w + 1) * WINDOW, STALE, false);
                tracker.status().clone()
            })
            .collect()
    }

    #[test]
    fn an_outage_starts_at_its_first_lost_round_and_ends_at_the_first_answered_of_the_recovery() {
        let mut t = Tracker::default();
        // Rounds at 0, 5, …: answered to 15 s, lost 20–45 s, one lucky round at 50 s, lost
        // 55 s, answered from 60 s.
        let lost = [false, false, false, false, true, true, true, true, true, true, false, true, false, false, false, false];
        let states = run(&mut t, 0, &lost);
        assert_eq!(states[0].state, State::Up);
        assert_eq!(states[0].since_ns, Some(0));
        assert_eq!(states[2].state, State::Up, "two lost rounds are not an outage");
        // Third lost round at 30 s: down from 20 s.
        assert_eq!((states[3].state, states[3].cause, states[3].since_ns), (State::Down, Cause::Unreachable, Some(20 * S)));
        // The lucky round at 50 s does not end it; the run from 60 s does, at its second round.
        assert_eq!(states[5].state, State::Down);
        assert_eq!((states[6].state, states[6].since_ns), (State::Up, Some(60 * S)));
        // By window, as closed: up 0-30 s and 60-80 s, down 30-60 s.
        assert_eq!((t.month().up_secs, t.month().down_secs), (50.0, 30.0));
        assert_eq!(t.month().availability(), Some(0.625));
    }

    #[test]
    fn a_short_loss_is_not_an_outage_and_silence_is_unknown() {
        let mut t = Tracker::default();
        let states = run(&mut t, 0, &[false, true, true, false, false, false]);
        assert!(states.iter().all(|s| s.state == State::Up), "{states:?}");
        // No round for two windows: unknown.
        t.evaluate(&ConnectionPolicy::default(), 30 * S, 40 * S, STALE, false);
        assert_eq!(t.status().state, State::Up, "the last round (25 s) is 15 s old");
        t.evaluate(&ConnectionPolicy::default(), 40 * S, 50 * S, STALE, false);
        assert_eq!((t.status().state, t.status().cause), (State::Unknown, Cause::NoTelemetry));
        assert_eq!(Tracker::default().status().state, State::Unknown, "nothing seen yet");
    }

    #[test]
    fn rounds_out_of_order_within_a_window_are_judged_in_event_time_order() {
        let policy = ConnectionPolicy::default();
        let mut a = Tracker::default();
        let mut b = Tracker::default();
        let rounds = [(0, 0.0), (2 * S, 1.0), (4 * S, 1.0), (6 * S, 1.0), (8 * S, 0.0)];
        for (t, l) in rounds {
            a.observe_round(t, l);
        }
        for (t, l) in rounds.iter().rev() {
            b.observe_round(*t, *l);
        }
        a.evaluate(&policy, 0, WINDOW, STALE, false);
        b.evaluate(&policy, 0, WINDOW, STALE, false);
        assert_eq!(a.status(), b.status());
        assert_eq!((a.status().state, a.status().since_ns), (State::Down, Some(2 * S)));
    }

    #[test]
    fn sites_below_a_down_site_are_upstream_down_naming_the_highest_one() {
        // 0 province; 1 district under 0; 2, 3 communes under 1.
        let parent = |i: usize| [None, Some(0), Some(1), Some(1)][i];
        let id = |i: usize| format!("s{i}");
        let policy = ConnectionPolicy::default();
        let mut trackers: Vec<Tracker> = (0..4).map(|_| Tracker::default()).collect();
        let down = |ts: &mut Vec<Tracker>, which: &[usize], w: i64| {
            for (i, t) in ts.iter_mut().enumerate() {
                for k in 0..2 {
                    t.observe_round(w * WINDOW + k * 5 * S, if which.contains(&i) { 1.0 } else { 0.0 });
                }
                t.evaluate(&policy, w * WINDOW, (w + 1) * WINDOW, STALE, false);
            }
            attribute_upstream(ts, parent, id, WINDOW);
        };
        down(&mut trackers, &[1, 2, 3], 0);
        down(&mut trackers, &[1, 2, 3], 1);
        let s = |ts: &Vec<Tracker>, i: usize| (ts[i].status().state, ts[i].status().cause, ts[i].status().upstream.clone());
        assert_eq!(s(&trackers, 1), (State::Down, Cause::Unreachable, None));
        assert_eq!(s(&trackers, 2), (State::Down, Cause::UpstreamDown, Some("s1".into())));
        assert_eq!(s(&trackers, 3), (State::Down, Cause::UpstreamDown, Some("s1".into())));
        assert_eq!(s(&trackers, 0).0, State::Up);
        // The district recovers first: its communes' outages keep their cause until they end.
        down(&mut trackers, &[2, 3], 2);
        assert_eq!(s(&trackers, 1).0, State::Up);
        assert_eq!(s(&trackers, 2), (State::Down, Cause::UpstreamDown, Some("s1".into())));
    }

    #[test]
    fn an_outage_that_began_before_its_upstreams_is_its_own_again_when_the_upstream_recovers() {
        // 0 district, 1 commune under it. The commune goes down at 0 s, the district 30 s later
        // and recovers first.
        let parent = |i: usize| [None, Some(0)][i];
        let id = |i: usize| format!("s{i}");
        let policy = ConnectionPolicy::default();
        let mut ts: Vec<Tracker> = (0..2).map(|_| Tracker::default()).collect();
        let mut window = |w: i64, lost: [bool; 2]| {
            for (i, t) in ts.iter_mut().enumerate() {
                for k in 0..2 {
                    t.observe_round(w * WINDOW + k * 5 * S, if lost[i] { 1.0 } else { 0.0 });
                }
                t.evaluate(&policy, w * WINDOW, (w + 1) * WINDOW, STALE, false);
            }
            attribute_upstream(&mut ts, parent, id, WINDOW);
            (ts[1].status().cause, ts[1].status().upstream.clone())
        };
        window(0, [false, true]);
        assert_eq!(window(1, [false, true]), (Cause::Unreachable, None));
        window(2, [false, true]);
        window(3, [true, true]);
        assert_eq!(window(4, [true, true]), (Cause::UpstreamDown, Some("s0".into())), "explained by the district while it is down");
        window(5, [false, true]);
        assert_eq!(window(6, [false, true]), (Cause::Unreachable, None), "its own outage again");
    }

    #[test]
    fn uplinks_reported_down_make_the_site_down_before_any_probe_says_so() {
        let policy = ConnectionPolicy::default();
        let mut t = Tracker::default();
        // Two uplinks; probes answered every 5 s throughout the first windows.
        let round = |t: &mut Tracker, at: i64, lost: bool| t.observe_round(at, if lost { 1.0 } else { 0.0 });
        round(&mut t, 0, false);
        t.observe_link(1 * S, 0, true);
        t.observe_link(1 * S, 1, true);
        round(&mut t, 5 * S, false);
        t.evaluate(&policy, 0, WINDOW, STALE, false);
        assert_eq!((t.status().state, t.status().cause), (State::Up, Cause::Answered));
        // One uplink down: still up (the other carries it).
        t.observe_link(12 * S, 0, false);
        round(&mut t, 15 * S, false);
        t.evaluate(&policy, WINDOW, 2 * WINDOW, STALE, false);
        assert_eq!(t.status().state, State::Up);
        // Both down at 21 s: down at once, from that sample, whatever the probes say next.
        t.observe_link(21 * S, 1, false);
        round(&mut t, 20 * S, false);
        round(&mut t, 25 * S, true);
        t.evaluate(&policy, 2 * WINDOW, 3 * WINDOW, STALE, false);
        assert_eq!((t.status().state, t.status().cause, t.status().since_ns), (State::Down, Cause::LinkDown, Some(21 * S)));
        // A link back at 33 s while the probes are still lost: the same outage goes on as
        // unreachable; two answered rounds end it at the first of them (40 s).
        round(&mut t, 30 * S, true);
        t.observe_link(33 * S, 0, true);
        round(&mut t, 35 * S, true);
        t.evaluate(&policy, 3 * WINDOW, 4 * WINDOW, STALE, false);
        assert_eq!((t.status().state, t.status().cause, t.status().since_ns), (State::Down, Cause::Unreachable, Some(21 * S)));
        round(&mut t, 40 * S, false);
        round(&mut t, 45 * S, false);
        t.evaluate(&policy, 4 * WINDOW, 5 * WINDOW, STALE, false);
        assert_eq!((t.status().state, t.status().since_ns), (State::Up, Some(40 * S)));
    }

    #[test]
    fn a_link_state_that_stopped_coming_says_nothing() {
        let policy = ConnectionPolicy::default();
        let mut t = Tracker::default();
        t.observe_link(1 * S, 0, false);
        t.observe_round(2 * S, 1.0);
        t.evaluate(&policy, 0, WINDOW, STALE, false);
        assert_eq!(t.status().cause, Cause::LinkDown);
        // No more link samples (its collector stopped); the probes answer again from 30 s.
        for k in 0..4 {
            t.observe_round(30 * S + k * 5 * S, 0.0);
        }
        t.evaluate(&policy, WINDOW, 5 * WINDOW, STALE, false);
        assert_eq!((t.status().state, t.status().since_ns), (State::Up, Some(30 * S)));
    }

    #[test]
    fn a_site_known_by_its_uplink_alone() {
        let policy = ConnectionPolicy::default();
        let mut t = Tracker::default();
        t.observe_link(3 * S, 0, true);
        t.evaluate(&policy, 0, WINDOW, STALE, false);
        assert_eq!((t.status().state, t.status().cause), (State::Up, Cause::LinkUp));
        t.observe_link(13 * S, 0, false);
        t.evaluate(&policy, WINDOW, 2 * WINDOW, STALE, false);
        assert_eq!((t.status().state, t.status().cause, t.status().since_ns), (State::Down, Cause::LinkDown, Some(13 * S)));
        t.observe_link(23 * S, 0, true);
        t.evaluate(&policy, 2 * WINDOW, 3 * WINDOW, STALE, false);
        assert_eq!((t.status().state, t.status().cause, t.status().since_ns), (State::Up, Cause::LinkUp, Some(23 * S)));
        // Its own link down is its own cause, whatever is down above it.
        t.observe_link(33 * S, 0, false);
        t.evaluate(&policy, 3 * WINDOW, 4 * WINDOW, STALE, false);
        t.set_upstream(Some(("above".into(), Some(0))), WINDOW);
        assert_eq!(t.status().cause, Cause::LinkDown);
        // Silence: unknown.
        t.evaluate(&policy, 4 * WINDOW, 5 * WINDOW, STALE, false);
        t.evaluate(&policy, 5 * WINDOW, 6 * WINDOW, STALE, false);
        assert_eq!(t.status().state, State::Unknown);
    }

    #[test]
    fn a_resumed_month_goes_on_without_counting_its_windows_twice() {
        let mut t = Tracker::default();
        // Read back from the history: 100 s up and 20 s down this month, through 30 s.
        t.resume_month(Month { first_day: 0, up_secs: 100.0, down_secs: 20.0, counted_through_ns: 30 * S });
        run(&mut t, 0, &[false; 16]);
        // Windows 0–30 s are evaluated again (a replay from the checkpoint): counted once.
        assert_eq!((t.month().up_secs, t.month().down_secs), (150.0, 20.0));
        // A new month starts from nothing.
        let next_month = 31 * 86_400 * S;
        run(&mut t, next_month, &[false; 4]);
        assert_eq!((t.month().first_day, t.month().up_secs, t.month().down_secs), (31, 20.0, 0.0));
    }

    #[test]
    fn months_are_calendar_months() {
        // 2026-01-31T23:59:50Z, then 2026-02-01T00:00:00Z; 2026-01-01 is day 20454.
        let jan31 = 1_769_903_990 * S;
        assert_eq!(month_first_day(jan31), 20_454);
        assert_eq!(month_first_day(jan31 + 10 * S), 20_454 + 31);
        assert_eq!(month_first_day(0), 0);
    }

    #[test]
    fn the_policy_refuses_zero_rounds() {
        let p = ConnectionPolicy { down_after_lost_rounds: 0, ..Default::default() };
        assert!(p.validate().unwrap_err().contains("connection.down_after_lost_rounds"));
    }
}
