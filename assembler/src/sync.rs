//! Module synchronisation by image_id.
//!
//! Images leave in strictly increasing image_id. An image is ready when every module delivered its
//! frame, or when each missing module has already delivered a *later* frame (receivers emit in
//! increasing order, so the missing frame will never come), or after `timeout`, or when more than
//! `max_pending` images wait. A module sending the same image twice is counted; the second copy is
//! ignored. A frame for an image already emitted is counted as late, with one exception: a new
//! acquisition whose ids start again at or below the last emitted one. Receivers commit frames in
//! strictly increasing order within an acquisition and start a new one only after the detector was
//! quiet for a second (`std_udp_recv::receiver::RESTART_IDLE`), so a module going back is a new
//! acquisition; so is any older id after a second without output. Both need nothing pending (the
//! last acquisition's images left: true when `frame_timeout_ms + module_sync_timeout_ms` is below
//! a second, as the defaults are).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use std_daq_common::ModuleFrame;

/// A new acquisition (ids restarting lower) is recognised after this long without output.
const RESTART_IDLE: Duration = Duration::from_secs(1);

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SyncStats {
    pub frames: u64,
    pub duplicate_frames: u64,
    pub late_frames: u64,
    pub invalid_frames: u64,
    pub images_complete: u64,
    pub images_missing_modules: u64,
}

/// What happened to one pushed frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    Accepted,
    Duplicate,
    Late,
    InvalidModule,
}

/// An image ready to assemble: `frames[m]` is None when module m's frame did not arrive.
#[derive(Debug, Clone)]
pub struct ReadyImage {
    pub image_id: u64,
    pub frames: Vec<Option<ModuleFrame>>,
    /// When the last of its module frames arrived (the latency clock starts here).
    pub last_frame_at: Instant,
}

#[derive(Debug)]
struct Pending {
    frames: Vec<Option<ModuleFrame>>,
    n_present: usize,
    first_seen: Instant,
    last_seen: Instant,
}

#[derive(Debug)]
pub struct Synchronizer {
    n_modules: usize,
    timeout: Duration,
    max_pending: usize,
    pending: BTreeMap<u64, Pending>,
    /// Highest image_id each module has delivered.
    latest: Vec<Option<u64>>,
    last_emitted: Option<(u64, Instant)>,
    /// Frame vectors of emitted images, reused so that steady state allocates no vectors.
    pool: Vec<Vec<Option<ModuleFrame>>>,
    pub stats: SyncStats,
}

impl Synchronizer {
    pub fn new(n_modules: usize, timeout: Duration, max_pending: usize) -> Self {
        Synchronizer {
            n_modules,
            timeout,
            max_pending: max_pending.max(1),
            pending: BTreeMap::new(),
            latest: vec![None; n_modules],
            last_emitted: None,
            pool: Vec::new(),
            stats: SyncStats::default(),
        }
    }

    pub fn push(&mut self, frame: ModuleFrame, now: Instant) -> Pushed {
        let m = usize::from(frame.module_id);
        if m >= self.n_modules {
            self.stats.invalid_frames += 1;
            return Pushed::InvalidModule;
        }
        self.stats.frames += 1;
        if let Some((last, at)) = self.last_emitted {
            if frame.image_id <= last {
                let module_went_back = self.latest[m].is_some_and(|l| frame.image_id <= l);
                if self.pending.is_empty()
                    && (module_went_back || now.duration_since(at) >= RESTART_IDLE)
                {
                    // A new acquisition whose ids start below the last run's.
                    self.last_emitted = None;
                    self.latest.iter_mut().for_each(|l| *l = None);
                } else {
                    self.stats.late_frames += 1;
                    return Pushed::Late;
                }
            }
        }
        let n_modules = self.n_modules;
        let pool = &mut self.pool;
        let entry = self
            .pending
            .entry(frame.image_id)
            .or_insert_with(|| Pending {
                frames: pool.pop().unwrap_or_else(|| vec![None; n_modules]),
                n_present: 0,
                first_seen: now,
                last_seen: now,
            });
        if entry.frames[m].is_some() {
            self.stats.duplicate_frames += 1;
            return Pushed::Duplicate;
        }
        entry.frames[m] = Some(frame);
        entry.n_present += 1;
        entry.last_seen = now;
        let latest = &mut self.latest[m];
        *latest = Some(latest.map_or(frame.image_id, |l| l.max(frame.image_id)));
        Pushed::Accepted
    }

    /// The next image to emit, if it is ready at `now`.
    pub fn pop_ready(&mut self, now: Instant) -> Option<ReadyImage> {
        let (&id, p) = self.pending.first_key_value()?;
        let complete = p.n_present == self.n_modules;
        let missing_moved_on = p
            .frames
            .iter()
            .zip(&self.latest)
            .all(|(f, latest)| f.is_some() || latest.is_some_and(|l| l > id));
        let timed_out = now.duration_since(p.first_seen) >= self.timeout;
        let overfull = self.pending.len() > self.max_pending;
        if !(complete || missing_moved_on || timed_out || overfull) {
            return None;
        }
        self.pop_first(now)
    }

    /// Emits the oldest pending image whatever its state (shutdown).
    pub fn pop_any(&mut self, now: Instant) -> Option<ReadyImage> {
        self.pop_first(now)
    }

    fn pop_first(&mut self, now: Instant) -> Option<ReadyImage> {
        let (image_id, p) = self.pending.pop_first()?;
        if p.n_present == self.n_modules {
            self.stats.images_complete += 1;
        } else {
            self.stats.images_missing_modules += 1;
        }
        self.last_emitted = Some((image_id, now));
        Some(ReadyImage {
            image_id,
            frames: p.frames,
            last_frame_at: p.last_seen,
        })
    }

    /// Gives an emitted image's frame vector back for reuse.
    pub fn recycle(&mut self, mut frames: Vec<Option<ModuleFrame>>) {
        if frames.len() == self.n_modules && self.pool.len() < self.max_pending + 1 {
            frames.fill(None);
            self.pool.push(frames);
        }
    }

    pub fn n_pending(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn f(id: u64, m: u16) -> ModuleFrame {
        ModuleFrame::new(id, m, 128)
    }

    fn ids(s: &mut Synchronizer, now: Instant) -> Vec<(u64, Vec<bool>)> {
        std::iter::from_fn(|| s.pop_ready(now))
            .map(|r| (r.image_id, r.frames.iter().map(Option::is_some).collect()))
            .collect()
    }

    #[test]
    fn complete_images_leave_in_order() {
        let t = Instant::now();
        let mut s = Synchronizer::new(2, Duration::from_secs(5), 50);
        s.push(f(2, 0), t);
        s.push(f(1, 0), t);
        s.push(f(2, 1), t);
        // Module 1 has moved past 1 without sending it: image 1 is final.
        assert_eq!(
            ids(&mut s, t),
            vec![(1, vec![true, false]), (2, vec![true, true])]
        );
        assert_eq!(s.stats.images_missing_modules, 1);
    }

    #[test]
    fn waits_for_a_slow_module_until_timeout() {
        let t = Instant::now();
        let mut s = Synchronizer::new(2, Duration::from_millis(100), 50);
        s.push(f(7, 0), t);
        assert!(s.pop_ready(t).is_none());
        assert!(s.pop_ready(t + Duration::from_millis(99)).is_none());
        let r = s.pop_ready(t + Duration::from_millis(100)).unwrap();
        assert_eq!(r.image_id, 7);
        assert!(r.frames[1].is_none());
    }

    #[test]
    fn duplicates_late_and_invalid_are_counted() {
        let t = Instant::now();
        let mut s = Synchronizer::new(2, Duration::from_secs(5), 50);
        assert_eq!(s.push(f(1, 0), t), Pushed::Accepted);
        assert_eq!(s.push(f(1, 0), t), Pushed::Duplicate);
        assert_eq!(s.push(f(1, 9), t), Pushed::InvalidModule);
        assert_eq!(s.push(f(1, 1), t), Pushed::Accepted);
        assert_eq!(ids(&mut s, t).len(), 1);
        // Module 1 sends image 1 again while image 2 is pending: late, not a new acquisition.
        assert_eq!(s.push(f(2, 0), t), Pushed::Accepted);
        assert_eq!(s.push(f(1, 1), t), Pushed::Late);
        assert_eq!(s.stats.duplicate_frames, 1);
        assert_eq!(s.stats.late_frames, 1);
        assert_eq!(s.stats.invalid_frames, 1);
    }

    #[test]
    fn overfull_window_emits_oldest() {
        let t = Instant::now();
        let mut s = Synchronizer::new(2, Duration::from_secs(5), 2);
        for id in 1..=3 {
            s.push(f(id, 0), t);
        }
        let out = ids(&mut s, t);
        assert_eq!(out.first().map(|o| o.0), Some(1));
        assert_eq!(s.n_pending() + out.len(), 3);
    }

    #[test]
    fn restart_after_idle_is_accepted() {
        let t = Instant::now();
        let mut s = Synchronizer::new(2, Duration::from_millis(100), 50);
        s.push(f(100, 0), t);
        let emitted = t + Duration::from_millis(100);
        assert_eq!(ids(&mut s, emitted), vec![(100, vec![true, false])]);
        // Module 1 never sent 100 and sends an older frame soon after: late.
        assert_eq!(
            s.push(f(1, 1), emitted + Duration::from_millis(10)),
            Pushed::Late
        );
        // After a second without output any older id starts a new acquisition.
        assert_eq!(
            s.push(f(1, 1), emitted + Duration::from_secs(2)),
            Pushed::Accepted
        );
    }

    /// Issue 18: a receiver goes back only when the detector restarted its frame counter; the
    /// assembler follows at once, even if its last image left less than a second ago (it may have
    /// waited for a module's timeout).
    #[test]
    fn a_module_going_back_starts_a_new_acquisition() {
        let t = Instant::now();
        let mut s = Synchronizer::new(2, Duration::from_secs(5), 50);
        for id in 399..=400 {
            s.push(f(id, 0), t);
            s.push(f(id, 1), t);
        }
        assert_eq!(ids(&mut s, t).len(), 2);
        let soon = t + Duration::from_millis(300);
        assert_eq!(s.push(f(1, 0), soon), Pushed::Accepted);
        assert_eq!(s.push(f(1, 1), soon), Pushed::Accepted);
        assert_eq!(s.push(f(2, 1), soon), Pushed::Accepted);
        assert_eq!(s.push(f(2, 0), soon), Pushed::Accepted);
        assert_eq!(
            ids(&mut s, soon),
            vec![(1, vec![true, true]), (2, vec![true, true])]
        );
        assert_eq!(s.stats.late_frames, 0);
    }
}
