//! Writing one slot from several threads, each in its own fixed set of byte regions: the
//! assembler's worker threads place the modules of one image straight into its slot.
//!
//! The regions are given once, at set-up, as a [`RegionPlan`]: per writer a list of byte ranges
//! of the slot (a module's rows, which interleave with other modules' rows, so they are sets of
//! row segments, not rectangles). The plan checks once that every range lies inside the slot and
//! that no two writers' ranges share a byte. A [`RegionRing`] owns the [`RingOwner`] (so no
//! [`crate::SlotWriter`] can exist beside it) and is a cheap, clonable, `Send + Sync` handle.
//!
//! Per image: one thread calls [`RegionRing::begin`]; writer `w` (any thread) takes its
//! [`RegionWriter`] with [`RegionRing::writer`], which hands out `&mut` slices only inside `w`'s
//! own ranges (checked per call, no allocation); once every writer is dropped, any number of
//! [`SlotView`]s may read the whole slot (e.g. to hash it in blocks); while others still write,
//! a [`RangeView`] reads bytes whose writers are done (a worker hashing what it wrote); then
//! [`RegionRing::commit`] publishes the image with its meta.
//!
//! ## Invariants (all checked under one `Mutex`)
//! ```text
//!  state: image in progress (or none) + bitmask of live writers + count of live views
//!         + per writer, the live range views over its bytes
//!
//!  begin(id)       an image in progress -> Busy; else seq := writing(id), fence(Release) (B)
//!  writer(w)       no image / w >= n_writers / w live / a view live / a range view over w's
//!                  bytes live -> refused; else w live
//!  view()          no image / a writer live -> refused; else views += 1
//!  view_range(r)   no image / r outside the slot / a writer of a byte of r live -> refused;
//!                  else every writer w with a byte in r: reading[w] += 1
//!  drop            clears its bit / views -= 1 / reading[w] -= 1 (the lock release publishes
//!                  its stores)
//!  commit(meta)    requires an image, no writer, no view and no range view live; writes meta,
//!                  seq := committed(id) with Release (A); image := none
//!  abandon()       an image with nothing live: seq := 0 (empty), image := none
//! ```
//! So a `&mut` byte is reachable through exactly one live writer (the plan's ranges are disjoint,
//! a writer exists once, views exclude writers, and a range view excludes the writers of its
//! bytes); the "writing" mark is stored before any
//! writer's bytes; and every writer's stores happen before the commit (each drop releases the
//! lock the commit takes; the commit's Release store (A) is what other processes' readers
//! Acquire). Readers in other processes see the seqlock protocol of the crate docs unchanged.
//!
//! Never: hand out a byte outside the writer's own ranges, let two writers' ranges overlap,
//! commit while a writer or view is live, allocate or block per image (a refused step is an
//! error the caller handles, not a wait).

use std::fmt;
use std::ops::Range;
use std::slice;
use std::sync::atomic::{fence, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytemuck::Pod;

use crate::layout::{committed_seq, writing_seq};
use crate::{RingOwner, MAX_IMAGE_ID};

/// The most writers a plan may have (one bit each in the live mask).
pub const MAX_REGION_WRITERS: usize = 64;

/// Why a plan was refused at set-up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("a region plan needs 1..={MAX_REGION_WRITERS} writers, got {0}")]
    WriterCount(usize),
    #[error("writer {writer}: bytes {start}..{end} are outside the {slot_bytes}-byte slot")]
    OutOfSlot {
        writer: usize,
        start: usize,
        end: usize,
        slot_bytes: usize,
    },
    #[error("writers {a} and {b} both claim bytes {start}..{end}")]
    Overlap {
        a: usize,
        b: usize,
        start: usize,
        end: usize,
    },
    #[error("the plan is for {plan}-byte slots, the ring has {ring}-byte slots")]
    SlotSize { plan: usize, ring: usize },
}

/// Why a per-image step was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegionError {
    #[error("image id {image_id} exceeds MAX_IMAGE_ID ({MAX_IMAGE_ID})")]
    ImageIdTooLarge { image_id: u64 },
    #[error("image {in_progress} is still being written (cannot begin image {image_id})")]
    Busy { in_progress: u64, image_id: u64 },
    #[error("no image is being written")]
    NoImage,
    #[error("writer {0} does not exist in the plan")]
    NoSuchWriter(usize),
    #[error("writer {0} is already live")]
    WriterLive(usize),
    #[error("image {image_id}: {why}")]
    NotNow { image_id: u64, why: &'static str },
    #[error(transparent)]
    Outside(#[from] OutsideRegion),
}

/// Bytes `offset..offset + len` are not inside one of the writer's ranges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("writer {writer}: bytes {offset}..+{len} are outside its regions")]
pub struct OutsideRegion {
    pub writer: usize,
    pub offset: usize,
    pub len: usize,
}

/// Per writer, its byte ranges of a slot: sorted, adjacent ones merged, disjoint from every other
/// writer's (checked by [`RegionPlan::new`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionPlan {
    slot_bytes: usize,
    ranges: Vec<Vec<Range<usize>>>,
}

impl RegionPlan {
    /// `per_writer[w]`: the byte ranges writer `w` may write, in any order (empty ranges are
    /// dropped, touching or overlapping ranges of one writer merged).
    pub fn new(slot_bytes: usize, per_writer: Vec<Vec<Range<usize>>>) -> Result<Self, PlanError> {
        if per_writer.is_empty() || per_writer.len() > MAX_REGION_WRITERS {
            return Err(PlanError::WriterCount(per_writer.len()));
        }
        let mut ranges = Vec::with_capacity(per_writer.len());
        for (writer, mut list) in per_writer.into_iter().enumerate() {
            list.retain(|r| !r.is_empty());
            if let Some(r) = list.iter().find(|r| r.end > slot_bytes) {
                return Err(PlanError::OutOfSlot {
                    writer,
                    start: r.start,
                    end: r.end,
                    slot_bytes,
                });
            }
            list.sort_by_key(|r| r.start);
            let mut merged: Vec<Range<usize>> = Vec::with_capacity(list.len());
            for r in list {
                match merged.last_mut() {
                    Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
                    _ => merged.push(r),
                }
            }
            merged.shrink_to_fit();
            ranges.push(merged);
        }
        // Every range with its writer, by start: overlaps between writers are neighbours.
        let mut all: Vec<(usize, &Range<usize>)> = ranges
            .iter()
            .enumerate()
            .flat_map(|(w, list)| list.iter().map(move |r| (w, r)))
            .collect();
        all.sort_by_key(|(_, r)| r.start);
        let mut reach: Option<(usize, usize)> = None; // (writer, end) of the furthest range so far
        for (w, r) in all {
            if let Some((a, end)) = reach {
                if r.start < end {
                    return Err(PlanError::Overlap {
                        a,
                        b: w,
                        start: r.start,
                        end: end.min(r.end),
                    });
                }
            }
            if reach.is_none_or(|(_, end)| r.end > end) {
                reach = Some((w, r.end));
            }
        }
        Ok(RegionPlan { slot_bytes, ranges })
    }

    pub fn n_writers(&self) -> usize {
        self.ranges.len()
    }

    /// Writer `w`'s ranges, sorted and merged.
    pub fn ranges(&self, w: usize) -> &[Range<usize>] {
        self.ranges.get(w).map_or(&[], Vec::as_slice)
    }

    pub fn slot_bytes(&self) -> usize {
        self.slot_bytes
    }
}

#[derive(Debug)]
struct State {
    /// (image_id, slot) of the image being written.
    image: Option<(u64, u64)>,
    /// Bit w set: writer w is live.
    writers: u64,
    views: u32,
    /// Live range views over writer w's bytes.
    reading: [u32; MAX_REGION_WRITERS],
    range_views: u32,
}

impl Default for State {
    fn default() -> Self {
        State {
            image: None,
            writers: 0,
            views: 0,
            reading: [0; MAX_REGION_WRITERS],
            range_views: 0,
        }
    }
}

struct Inner<M: Pod> {
    owner: RingOwner<M>,
    plan: RegionPlan,
    state: Mutex<State>,
}

/// A ring whose slots several threads write, each in its own regions; see the module docs.
pub struct RegionRing<M: Pod> {
    inner: Arc<Inner<M>>,
}

impl<M: Pod> Clone for RegionRing<M> {
    fn clone(&self) -> Self {
        RegionRing {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<M: Pod> fmt::Debug for RegionRing<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegionRing")
            .field("owner", &self.inner.owner)
            .field("writers", &self.inner.plan.n_writers())
            .finish_non_exhaustive()
    }
}

/// A poisoned lock only means a thread panicked while holding it; the state is updated in single
/// statements, so it is still consistent.
fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<M: Pod> RingOwner<M> {
    /// Turns the single-writer owner into a [`RegionRing`] written by `plan`'s writers (the
    /// segment lives until the last handle, writer and view are dropped).
    pub fn into_regions(self, plan: RegionPlan) -> Result<RegionRing<M>, PlanError> {
        let ring = self.layout().slot_len();
        if plan.slot_bytes != ring {
            return Err(PlanError::SlotSize {
                plan: plan.slot_bytes,
                ring,
            });
        }
        Ok(RegionRing {
            inner: Arc::new(Inner {
                owner: self,
                plan,
                state: Mutex::new(State::default()),
            }),
        })
    }
}

impl<M: Pod> RegionRing<M> {
    pub fn name(&self) -> &str {
        self.inner.owner.name()
    }

    pub fn path(&self) -> &std::path::Path {
        self.inner.owner.path()
    }

    pub fn n_slots(&self) -> u64 {
        self.inner.owner.n_slots()
    }

    pub fn slot_bytes(&self) -> u64 {
        self.inner.owner.slot_bytes()
    }

    pub fn plan(&self) -> &RegionPlan {
        &self.inner.plan
    }

    /// Starts writing `image_id` into slot `image_id % n_slots`; readers of that slot get
    /// `NotPresent`/`Overwritten` from now until [`Self::commit`].
    pub fn begin(&self, image_id: u64) -> Result<(), RegionError> {
        if image_id > MAX_IMAGE_ID {
            return Err(RegionError::ImageIdTooLarge { image_id });
        }
        let mut state = lock(&self.inner.state);
        if let Some((in_progress, _)) = state.image {
            return Err(RegionError::Busy {
                in_progress,
                image_id,
            });
        }
        let slot = self.inner.owner.layout().slot_of(image_id);
        self.inner
            .owner
            .seq(slot)
            .store(writing_seq(image_id), Ordering::Relaxed);
        // (B): the "writing" mark is visible before any writer's data or the meta store.
        fence(Ordering::Release);
        state.image = Some((image_id, slot));
        Ok(())
    }

    /// Writer `w`'s access to its regions of the image in progress.
    pub fn writer(&self, w: usize) -> Result<RegionWriter<M>, RegionError> {
        if w >= self.inner.plan.n_writers() {
            return Err(RegionError::NoSuchWriter(w));
        }
        let mut state = lock(&self.inner.state);
        let Some((image_id, slot)) = state.image else {
            return Err(RegionError::NoImage);
        };
        if state.views > 0 {
            return Err(RegionError::NotNow {
                image_id,
                why: "the slot is being read",
            });
        }
        let bit = 1u64 << w;
        if state.writers & bit != 0 {
            return Err(RegionError::WriterLive(w));
        }
        if state.reading.get(w).is_some_and(|n| *n > 0) {
            return Err(RegionError::NotNow {
                image_id,
                why: "the writer's bytes are being read",
            });
        }
        state.writers |= bit;
        Ok(RegionWriter {
            ring: self.clone(),
            writer: w,
            image_id,
            data_offset: self.inner.owner.layout().data_offset(slot),
            hint: 0,
        })
    }

    /// Read access to the whole slot of the image in progress, once no writer is live.
    pub fn view(&self) -> Result<SlotView<M>, RegionError> {
        let mut state = lock(&self.inner.state);
        let Some((image_id, slot)) = state.image else {
            return Err(RegionError::NoImage);
        };
        if state.writers != 0 {
            return Err(RegionError::NotNow {
                image_id,
                why: "a writer is live",
            });
        }
        state.views += 1;
        Ok(SlotView {
            ring: self.clone(),
            data_offset: self.inner.owner.layout().data_offset(slot),
        })
    }

    /// Read access to slot bytes `range` of the image in progress while other writers may still
    /// write elsewhere: refused while a writer with a byte in `range` is live; meanwhile no such
    /// writer can be taken. Locks once and checks every writer's ranges (binary search).
    pub fn view_range(&self, range: Range<usize>) -> Result<RangeView<M>, RegionError> {
        let mut state = lock(&self.inner.state);
        let Some((image_id, slot)) = state.image else {
            return Err(RegionError::NoImage);
        };
        let plan = &self.inner.plan;
        if range.start > range.end || range.end > plan.slot_bytes {
            return Err(RegionError::Outside(OutsideRegion {
                writer: usize::MAX,
                offset: range.start,
                len: range.end.saturating_sub(range.start),
            }));
        }
        let mut covers = 0u64;
        for w in 0..plan.n_writers() {
            let ranges = plan.ranges(w);
            let i = ranges.partition_point(|r| r.end <= range.start);
            if ranges.get(i).is_some_and(|r| r.start < range.end) {
                covers |= 1 << w;
            }
        }
        if state.writers & covers != 0 {
            return Err(RegionError::NotNow {
                image_id,
                why: "a writer of these bytes is live",
            });
        }
        for w in 0..plan.n_writers() {
            if covers & (1 << w) != 0 {
                state.reading[w] += 1;
            }
        }
        state.range_views += 1;
        Ok(RangeView {
            ring: self.clone(),
            data_offset: self.inner.owner.layout().data_offset(slot),
            range,
            covers,
        })
    }

    /// Publishes the image in progress with `meta`; returns its id. The bytes no writer wrote
    /// keep what the slot held before: the plan must cover the whole image.
    pub fn commit(&self, meta: M) -> Result<u64, RegionError> {
        let mut state = lock(&self.inner.state);
        let Some((image_id, slot)) = state.image else {
            return Err(RegionError::NoImage);
        };
        if state.writers != 0 || state.views != 0 || state.range_views != 0 {
            return Err(RegionError::NotNow {
                image_id,
                why: "a writer or view is still live",
            });
        }
        // SAFETY: the meta record of `slot` is inside the mapping, 8-byte aligned, and M is Pod
        // with align <= 8 (asserted in RingOwner::create). We hold the lock and no writer or view
        // is live, so nothing in this process references the slot; other processes only read it
        // under the seqlock, which shows "writing" since begin.
        unsafe { self.inner.owner.meta_ptr(slot).write(meta) };
        // (A): every writer's stores (published to us by the lock) and the meta store above are
        // visible before the committed mark.
        self.inner
            .owner
            .seq(slot)
            .store(committed_seq(image_id), Ordering::Release);
        state.image = None;
        Ok(image_id)
    }

    /// Gives up the image in progress (readers see `NotPresent` in its slot) if nothing is live;
    /// returns whether there was one to give up.
    pub fn abandon(&self) -> bool {
        let mut state = lock(&self.inner.state);
        match state.image {
            Some((_, slot)) if state.writers == 0 && state.views == 0 && state.range_views == 0 => {
                self.inner.owner.seq(slot).store(0, Ordering::Release);
                state.image = None;
                true
            }
            _ => false,
        }
    }
}

/// Exclusive access to one writer's regions of the image in progress; dropping it ends it.
pub struct RegionWriter<M: Pod> {
    ring: RegionRing<M>,
    writer: usize,
    image_id: u64,
    /// Offset of the slot's data in the mapping.
    data_offset: usize,
    /// Index of the range the last request fell in: requests mostly walk the ranges in order
    /// (or in reverse order, for modules mirrored vertically).
    hint: usize,
}

impl<M: Pod> RegionWriter<M> {
    pub fn writer(&self) -> usize {
        self.writer
    }

    pub fn image_id(&self) -> u64 {
        self.image_id
    }

    /// Whether the slot's data starts at an address that is a multiple of `align` (it is page
    /// aligned, so for every power of two up to 4096).
    pub fn is_aligned_to(&self, align: usize) -> bool {
        let base = self.ring.inner.owner.map_ptr() as usize + self.data_offset;
        align != 0 && base.is_multiple_of(align)
    }

    /// Slot bytes `offset..offset + len` (they still hold whatever the slot held before), if they
    /// lie inside one of this writer's ranges.
    pub fn bytes_mut(&mut self, offset: usize, len: usize) -> Result<&mut [u8], OutsideRegion> {
        let outside = OutsideRegion {
            writer: self.writer,
            offset,
            len,
        };
        let end = offset.checked_add(len).ok_or(outside)?;
        let ranges = self.ring.inner.plan.ranges(self.writer);
        let inside = |i: usize| {
            ranges
                .get(i)
                .is_some_and(|r| r.start <= offset && end <= r.end)
        };
        let i = if inside(self.hint) {
            self.hint
        } else if inside(self.hint + 1) {
            self.hint + 1
        } else if self.hint > 0 && inside(self.hint - 1) {
            // Mirrored modules walk their rows downwards in memory.
            self.hint - 1
        } else {
            // The last range starting at or before `offset`.
            let i = ranges.partition_point(|r| r.start <= offset);
            match i.checked_sub(1) {
                Some(i) if inside(i) => i,
                _ => return Err(outside),
            }
        };
        self.hint = i;
        let start = self.data_offset + offset;
        // SAFETY: the range `offset..end` lies inside one of this writer's plan ranges, which
        // RegionPlan::new checked to be inside the slot's `slot_bytes` and disjoint from every
        // other writer's ranges; the slot's data is inside the writable mapping, which `self.ring`
        // keeps alive. This writer's bit is set in the state until it drops, so no other writer w
        // and no SlotView exist meanwhile, and `&mut self` makes the slice unique within this
        // writer. Other processes only read the slot under the seqlock, marked "writing".
        Ok(unsafe { slice::from_raw_parts_mut(self.ring.inner.owner.map_ptr().add(start), len) })
    }
}

impl<M: Pod> Drop for RegionWriter<M> {
    fn drop(&mut self) {
        lock(&self.ring.inner.state).writers &= !(1u64 << self.writer);
    }
}

impl<M: Pod> fmt::Debug for RegionWriter<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegionWriter")
            .field("ring", &self.ring.name())
            .field("writer", &self.writer)
            .field("image_id", &self.image_id)
            .finish_non_exhaustive()
    }
}

/// Shared read access to the whole slot of the image in progress (no writer is live meanwhile).
pub struct SlotView<M: Pod> {
    ring: RegionRing<M>,
    data_offset: usize,
}

impl<M: Pod> SlotView<M> {
    /// The slot's data, exactly `slot_bytes` long.
    pub fn data(&self) -> &[u8] {
        let owner = &self.ring.inner.owner;
        // SAFETY: the slot's data (slot_len bytes at data_offset) is inside the mapping, which
        // `self.ring` keeps alive. While this view is counted in the state no RegionWriter can be
        // taken, and the ring owns the RingOwner, so nothing in this process writes these bytes;
        // other processes only read them.
        unsafe {
            slice::from_raw_parts(
                owner.map_ptr().add(self.data_offset).cast_const(),
                owner.layout().slot_len(),
            )
        }
    }
}

impl<M: Pod> Drop for SlotView<M> {
    fn drop(&mut self) {
        let mut state = lock(&self.ring.inner.state);
        state.views = state.views.saturating_sub(1);
    }
}

impl<M: Pod> fmt::Debug for SlotView<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SlotView")
            .field("ring", &self.ring.name())
            .finish_non_exhaustive()
    }
}

/// Shared read access to some bytes of the image in progress whose writers are done (none of
/// them can be taken meanwhile).
pub struct RangeView<M: Pod> {
    ring: RegionRing<M>,
    data_offset: usize,
    range: Range<usize>,
    /// Bit w: writer w has a byte in `range`.
    covers: u64,
}

impl<M: Pod> RangeView<M> {
    /// The slot's bytes `range`.
    pub fn data(&self) -> &[u8] {
        let owner = &self.ring.inner.owner;
        // SAFETY: `range` lies inside the slot's `slot_bytes` (checked by view_range), inside the
        // mapping that `self.ring` keeps alive. Only a RegionWriter whose ranges share a byte with
        // `range` could write these bytes (the plan's ranges are disjoint and bytes_mut stays
        // inside its own); none was live when this view was made, and `reading` keeps every one
        // of them from being taken until it drops. Other processes only read the slot.
        unsafe {
            slice::from_raw_parts(
                owner
                    .map_ptr()
                    .add(self.data_offset + self.range.start)
                    .cast_const(),
                self.range.len(),
            )
        }
    }
}

impl<M: Pod> Drop for RangeView<M> {
    fn drop(&mut self) {
        let mut state = lock(&self.ring.inner.state);
        for w in 0..MAX_REGION_WRITERS {
            if self.covers & (1 << w) != 0 {
                state.reading[w] = state.reading[w].saturating_sub(1);
            }
        }
        state.range_views = state.range_views.saturating_sub(1);
    }
}

impl<M: Pod> fmt::Debug for RangeView<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RangeView")
            .field("ring", &self.ring.name())
            .field("range", &self.range)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Expect, ReadError, RingReader};

    #[test]
    fn a_range_view_reads_finished_writers_bytes_and_holds_them_off() {
        let name = format!("test-regions-range-{}", std::process::id());
        // Writer w owns bytes 32w..32w + 32 of a 128-byte slot.
        let plan = RegionPlan::new(
            128,
            (0..4)
                .map(|w| std::iter::once(w * 32..w * 32 + 32).collect())
                .collect(),
        )
        .unwrap();
        let ring = RingOwner::<u64>::create(&name, 4, 128)
            .unwrap()
            .into_regions(plan)
            .unwrap();
        ring.begin(3).unwrap();
        for w in 0..2 {
            ring.writer(w)
                .unwrap()
                .bytes_mut(w * 32, 32)
                .unwrap()
                .fill(w as u8 + 1);
        }
        let live = ring.writer(2).unwrap();
        // Bytes of writers 0 and 1 (done) while writer 2 writes.
        let view = ring.view_range(16..64).unwrap();
        assert_eq!(view.data(), [[1u8; 16], [2; 16], [2; 16]].concat());
        // Writer 2 is live: its bytes cannot be viewed, and the viewed writers cannot be taken.
        assert!(matches!(
            ring.view_range(60..70),
            Err(RegionError::NotNow { .. })
        ));
        assert!(matches!(ring.writer(1), Err(RegionError::NotNow { .. })));
        assert!(ring.writer(3).is_ok(), "a writer outside the view");
        assert!(matches!(
            ring.view_range(120..130),
            Err(RegionError::Outside(_))
        ));
        assert!(matches!(ring.commit(3), Err(RegionError::NotNow { .. })));
        drop(live);
        drop(view);
        assert!(
            ring.writer(1).is_ok(),
            "free again once the view is dropped"
        );
        assert_eq!(ring.commit(3), Ok(3));
    }

    #[test]
    fn plans_merge_ranges_and_refuse_overlaps_and_outside_bytes() {
        let plan =
            RegionPlan::new(100, vec![vec![10..20, 0..10, 30..40, 35..38], vec![20..30]]).unwrap();
        assert_eq!(plan.ranges(0), &[0..20, 30..40]);
        assert_eq!(plan.ranges(1), std::slice::from_ref(&(20..30)));
        assert_eq!(
            RegionPlan::new(100, vec![vec![0..10, 50..60], vec![55..70]]),
            Err(PlanError::Overlap {
                a: 0,
                b: 1,
                start: 55,
                end: 60
            })
        );
        // A long range of writer 0 hiding a later overlap behind a short one of writer 1.
        assert!(matches!(
            RegionPlan::new(100, vec![vec![0..50], vec![10..12], vec![40..41]]),
            Err(PlanError::Overlap { a: 0, b: 1, .. })
        ));
        assert!(matches!(
            RegionPlan::new(100, vec![vec![90..101]]),
            Err(PlanError::OutOfSlot { writer: 0, .. })
        ));
        assert_eq!(RegionPlan::new(100, vec![]), Err(PlanError::WriterCount(0)));
    }

    fn interleaved(name: &str) -> (RegionRing<u64>, RingReader<u64>) {
        // 8 rows of 16 bytes; writer 0 owns the left half of every row, writer 1 the right.
        let plan = RegionPlan::new(
            128,
            vec![
                (0..8).map(|r| r * 16..r * 16 + 8).collect(),
                (0..8).map(|r| r * 16 + 8..r * 16 + 16).collect(),
            ],
        )
        .unwrap();
        let ring = RingOwner::<u64>::create(name, 4, 128)
            .unwrap()
            .into_regions(plan)
            .unwrap();
        let reader = RingReader::<u64>::attach(name, Expect::default()).unwrap();
        (ring, reader)
    }

    #[test]
    fn writers_on_threads_fill_their_interleaved_regions_and_commit_once() {
        let name = format!("test-regions-threads-{}", std::process::id());
        let (ring, reader) = interleaved(&name);
        ring.begin(6).unwrap();
        let handles: Vec<_> = (0..2)
            .map(|w| {
                let ring = ring.clone();
                std::thread::spawn(move || {
                    let mut writer = ring.writer(w).unwrap();
                    assert!(writer.is_aligned_to(4096));
                    for r in 0..8 {
                        writer
                            .bytes_mut(r * 16 + 8 * w, 8)
                            .unwrap()
                            .fill((10 * w + r) as u8);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let view = ring.view().unwrap();
        let want: Vec<u8> = (0..8u8)
            .flat_map(|r| [[r; 8], [10 + r; 8]])
            .flatten()
            .collect();
        assert_eq!(view.data(), &want[..]);
        assert!(
            reader.read(6, |_, _| ()).is_err(),
            "not visible before commit"
        );
        drop(view);
        assert_eq!(ring.commit(66), Ok(6));
        let (meta, data) = reader.read(6, |m, d| (*m, d[..128].to_vec())).unwrap();
        assert_eq!((meta, data), (66, want));
    }

    #[test]
    fn bytes_outside_the_writers_regions_and_out_of_turn_steps_are_refused() {
        let name = format!("test-regions-refuse-{}", std::process::id());
        let (ring, reader) = interleaved(&name);
        assert_eq!(ring.writer(0).map(|_| ()), Err(RegionError::NoImage));
        ring.begin(1).unwrap();
        assert_eq!(
            ring.begin(2),
            Err(RegionError::Busy {
                in_progress: 1,
                image_id: 1 + 1
            })
        );
        let mut w0 = ring.writer(0).unwrap();
        assert_eq!(ring.writer(0).map(|_| ()), Err(RegionError::WriterLive(0)));
        assert_eq!(
            ring.writer(2).map(|_| ()),
            Err(RegionError::NoSuchWriter(2))
        );
        assert!(w0.bytes_mut(0, 8).is_ok());
        assert!(w0.bytes_mut(16, 8).is_ok(), "the next row");
        assert!(w0.bytes_mut(112, 8).is_ok(), "far away (binary search)");
        assert!(w0.bytes_mut(96, 8).is_ok(), "the row before");
        assert!(w0.bytes_mut(0, 8).is_ok(), "far back");
        for (offset, len) in [(4, 8), (8, 1), (120, 8), (usize::MAX, 2), (128, 0)] {
            assert_eq!(
                w0.bytes_mut(offset, len).map(|_| ()),
                Err(OutsideRegion {
                    writer: 0,
                    offset,
                    len
                }),
                "{offset}+{len}"
            );
        }
        assert!(ring.view().is_err(), "a writer is live");
        assert!(ring.commit(0).is_err());
        assert!(!ring.abandon(), "a writer is live");
        drop(w0);
        let view = ring.view().unwrap();
        assert!(ring.writer(1).is_err(), "a view is live");
        assert!(ring.commit(0).is_err());
        drop(view);
        assert!(ring.abandon());
        assert_eq!(reader.read(1, |_, _| ()), Err(ReadError::NotPresent));
        assert!(ring.begin(5).is_ok());
    }
}
