//! Writing one slot from several threads at once: a receiver that reads the parts of an image
//! from several connections in parallel writes each part straight into the slot, instead of into
//! a buffer that one thread then copies.
//!
//! A [`SharedRing`] owns the [`RingOwner`] (so no [`crate::SlotWriter`] can exist beside it) and is
//! a cheap, clonable, `Send + Sync` handle. Any thread may [`SharedRing::claim`] a byte range of
//! the slot of `image_id`; the returned [`PartWriter`] is the only way to reach those bytes and
//! releases its range when dropped. One thread then [`SharedRing::commit`]s the image with its
//! meta once no claim is live.
//!
//! ## Invariants (all checked under the slot's lock, one `Mutex` per slot)
//! ```text
//!  per slot: claimed image (or none) + the byte ranges of the live PartWriters
//!
//!  claim(id, range)   slot claimed for another id (live parts or not) -> SlotBusy
//!                     slot not claimed for id -> seq := writing(id), fence(Release) (B),
//!                                                claimed image := id
//!                     range overlaps a live part of id           -> Overlap
//!                     otherwise: range becomes live, PartWriter returned
//!  PartWriter drop    its range stops being live (lock release publishes its stores)
//!  commit(id, meta)   requires claimed image == id and no live part; writes meta,
//!                     seq := committed(id) with Release (A); claimed image := none
//!  abandon_unfinished every claimed slot without live parts: seq := 0 (empty), claimed := none
//! ```
//! So two live writers never alias a byte; the "writing" mark is stored before any part's bytes
//! (a part's stores happen after its claim took the lock that the marking claim released); and
//! every part's stores happen before the commit (each drop releases the lock the commit takes,
//! and the commit's Release store (A) is what other processes' readers Acquire). Readers in other
//! processes see the seqlock protocol of the crate docs unchanged.
//!
//! Never: hand out overlapping ranges, commit while a part is live, or block (a busy slot is an
//! error the caller handles, not a wait).

use std::fmt;
use std::slice;
use std::sync::atomic::{fence, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytemuck::Pod;

use crate::layout::{committed_seq, writing_seq};
use crate::{RingOwner, MAX_IMAGE_ID};

/// Why a claim or commit was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClaimError {
    #[error("image id {image_id} exceeds MAX_IMAGE_ID ({MAX_IMAGE_ID})")]
    ImageIdTooLarge { image_id: u64 },
    #[error("bytes {offset}..{end} are outside the {slot_bytes}-byte slots", end = .offset.saturating_add(*.len as u64))]
    OutOfSlot {
        offset: u64,
        len: usize,
        slot_bytes: u64,
    },
    #[error(
        "slot {slot} is still being written with image {holder} (cannot start image {image_id}): \
         the ring has too few slots for the images in flight"
    )]
    SlotBusy {
        slot: u64,
        holder: u64,
        /// The tag the holder's first claim gave (the caller's ordering, e.g. a stream position).
        holder_tag: u64,
        image_id: u64,
    },
    #[error("bytes {offset}..+{len} of image {image_id} overlap a part still being written")]
    Overlap {
        image_id: u64,
        offset: usize,
        len: usize,
    },
    #[error("image {image_id} cannot be committed: {why}")]
    NotCommittable { image_id: u64, why: &'static str },
}

#[derive(Debug, Default)]
struct SlotClaims {
    /// The image being written and its first claim's tag; stays until commit or abandon.
    image_id: Option<u64>,
    tag: u64,
    /// (offset, len) of every live PartWriter of `image_id`.
    live: Vec<(usize, usize)>,
}

struct Inner<M: Pod> {
    owner: RingOwner<M>,
    claims: Box<[Mutex<SlotClaims>]>,
}

/// A ring whose slots several threads write in parts; see the module docs.
pub struct SharedRing<M: Pod> {
    inner: Arc<Inner<M>>,
}

impl<M: Pod> Clone for SharedRing<M> {
    fn clone(&self) -> Self {
        SharedRing {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<M: Pod> fmt::Debug for SharedRing<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedRing")
            .field("owner", &self.inner.owner)
            .finish_non_exhaustive()
    }
}

impl<M: Pod> RingOwner<M> {
    /// Turns the single-writer owner into a [`SharedRing`] (the segment lives until the last
    /// handle and the last [`PartWriter`] are dropped).
    pub fn into_shared(self) -> SharedRing<M> {
        let claims = (0..self.n_slots())
            .map(|_| Mutex::new(SlotClaims::default()))
            .collect();
        SharedRing {
            inner: Arc::new(Inner {
                owner: self,
                claims,
            }),
        }
    }
}

/// A poisoned slot lock only means a thread panicked while holding it; the claims it protects are
/// updated in single statements, so they are still consistent.
fn lock(m: &Mutex<SlotClaims>) -> MutexGuard<'_, SlotClaims> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<M: Pod> SharedRing<M> {
    pub fn slot_bytes(&self) -> u64 {
        self.inner.owner.slot_bytes()
    }

    pub fn name(&self) -> &str {
        self.inner.owner.name()
    }

    /// Claims bytes `offset..offset + len` of the slot of `image_id` for writing. The first claim
    /// of an image marks the slot as being written (its previous image is gone for readers) and
    /// records `tag`; the slot then belongs to that image until [`Self::commit`] or
    /// [`Self::abandon_unfinished`], so parts already written are never overwritten by another
    /// image's claim.
    pub fn claim(
        &self,
        image_id: u64,
        tag: u64,
        offset: usize,
        len: usize,
    ) -> Result<PartWriter<M>, ClaimError> {
        if image_id > MAX_IMAGE_ID {
            return Err(ClaimError::ImageIdTooLarge { image_id });
        }
        let slot_len = self.inner.owner.layout().slot_len();
        if offset.checked_add(len).is_none_or(|end| end > slot_len) {
            return Err(ClaimError::OutOfSlot {
                offset: offset as u64,
                len,
                slot_bytes: self.slot_bytes(),
            });
        }
        let slot = self.inner.owner.layout().slot_of(image_id);
        let mut claims = lock(&self.inner.claims[slot as usize]);
        match claims.image_id {
            Some(holder) if holder != image_id => {
                return Err(ClaimError::SlotBusy {
                    slot,
                    holder,
                    holder_tag: claims.tag,
                    image_id,
                });
            }
            Some(holder) if holder == image_id => {
                if claims
                    .live
                    .iter()
                    .any(|&(o, l)| offset < o + l && o < offset + len)
                {
                    return Err(ClaimError::Overlap {
                        image_id,
                        offset,
                        len,
                    });
                }
            }
            _ => {
                self.inner
                    .owner
                    .seq(slot)
                    .store(writing_seq(image_id), Ordering::Relaxed);
                // (B): the "writing" mark is visible before any part's data or meta store.
                fence(Ordering::Release);
                claims.image_id = Some(image_id);
                claims.tag = tag;
                claims.live.clear();
            }
        }
        claims.live.push((offset, len));
        Ok(PartWriter {
            ring: self.clone(),
            slot,
            image_id,
            offset,
            len,
        })
    }

    /// Publishes `image_id` with `meta` once every part claimed for it has been dropped. The bytes
    /// no part wrote keep what the slot held before: callers claim and write the whole image.
    pub fn commit(&self, image_id: u64, meta: M) -> Result<(), ClaimError> {
        if image_id > MAX_IMAGE_ID {
            return Err(ClaimError::ImageIdTooLarge { image_id });
        }
        let slot = self.inner.owner.layout().slot_of(image_id);
        let mut claims = lock(&self.inner.claims[slot as usize]);
        if claims.image_id != Some(image_id) {
            return Err(ClaimError::NotCommittable {
                image_id,
                why: "no part of it was claimed",
            });
        }
        if !claims.live.is_empty() {
            return Err(ClaimError::NotCommittable {
                image_id,
                why: "a part is still being written",
            });
        }
        // SAFETY: the meta record of `slot` is inside the mapping, 8-byte aligned, and M is Pod
        // with align <= 8 (asserted in RingOwner::create). We hold the slot's lock and no part is
        // live, so nothing in this process references the slot; other processes only read it
        // under the seqlock, which shows "writing" since the first claim.
        unsafe { self.inner.owner.meta_ptr(slot).write(meta) };
        // (A): every part's stores (published to us by the lock) and the meta store above are
        // visible before the committed mark.
        self.inner
            .owner
            .seq(slot)
            .store(committed_seq(image_id), Ordering::Release);
        claims.image_id = None;
        Ok(())
    }

    /// Empties every slot that was claimed and never committed and has no live part (e.g. after
    /// the connections that wrote them were dropped): readers see `NotPresent` there, and the
    /// slots may take other images. Returns how many slots it emptied.
    pub fn abandon_unfinished(&self) -> usize {
        let mut emptied = 0;
        for (slot, m) in self.inner.claims.iter().enumerate() {
            let mut claims = lock(m);
            if claims.image_id.is_some() && claims.live.is_empty() {
                self.inner
                    .owner
                    .seq(slot as u64)
                    .store(0, Ordering::Release);
                claims.image_id = None;
                emptied += 1;
            }
        }
        emptied
    }
}

/// Exclusive access to one claimed byte range of a slot; dropping it ends the claim.
pub struct PartWriter<M: Pod> {
    ring: SharedRing<M>,
    slot: u64,
    image_id: u64,
    offset: usize,
    len: usize,
}

impl<M: Pod> PartWriter<M> {
    /// The claimed bytes (they still hold whatever the slot held before).
    pub fn data_mut(&mut self) -> &mut [u8] {
        let owner = &self.ring.inner.owner;
        let start = owner.layout().data_offset(self.slot) + self.offset;
        // SAFETY: claim checked offset + len <= slot_len, so the range lies inside the slot's data
        // in the writable mapping, which `self.ring` keeps alive. The range was registered as live
        // under the slot's lock after checking it overlaps no other live part, and it stays
        // registered until this writer drops, so this is the only reference to these bytes in
        // this process (`&mut self` makes it unique within this writer). Other processes only
        // read the slot under the seqlock, which is marked "writing".
        unsafe { slice::from_raw_parts_mut(owner.map_ptr().add(start), self.len) }
    }
}

impl<M: Pod> Drop for PartWriter<M> {
    fn drop(&mut self) {
        let mut claims = lock(&self.ring.inner.claims[self.slot as usize]);
        if let Some(i) = claims
            .live
            .iter()
            .position(|&r| r == (self.offset, self.len))
        {
            claims.live.swap_remove(i);
        }
    }
}

impl<M: Pod> fmt::Debug for PartWriter<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PartWriter")
            .field("ring", &self.ring.name())
            .field("image_id", &self.image_id)
            .field("offset", &self.offset)
            .field("len", &self.len)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Expect, ReadError, RingReader};

    fn ring(name: &str) -> SharedRing<u64> {
        RingOwner::<u64>::create(name, 4, 64).unwrap().into_shared()
    }

    #[test]
    fn parts_written_by_several_threads_commit_as_one_image() {
        let name = format!("test-shared-parts-{}", std::process::id());
        let ring = ring(&name);
        let reader = RingReader::<u64>::attach(&name, Expect::default()).unwrap();
        let handles: Vec<_> = (0..4)
            .map(|k| {
                let ring = ring.clone();
                std::thread::spawn(move || {
                    let mut part = ring.claim(9, 0, k * 16, 16).unwrap();
                    part.data_mut().fill(k as u8 + 1);
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        ring.commit(9, 99).unwrap();
        let (meta, data) = reader.read(9, |m, d| (*m, d[..64].to_vec())).unwrap();
        assert_eq!(meta, 99);
        let want: Vec<u8> = (1..=4u8).flat_map(|k| [k; 16]).collect();
        assert_eq!(data, want);
    }

    #[test]
    fn overlapping_busy_and_early_commits_are_refused() {
        let name = format!("test-shared-refuse-{}", std::process::id());
        let ring = ring(&name);
        let reader = RingReader::<u64>::attach(&name, Expect::default()).unwrap();
        let mut a = ring.claim(1, 10, 0, 32).unwrap();
        a.data_mut().fill(7);
        assert!(matches!(
            ring.claim(1, 10, 16, 32),
            Err(ClaimError::Overlap { .. })
        ));
        // Image 5 lives in the same slot (5 % 4 == 1) while image 1 is being written.
        assert!(matches!(
            ring.claim(5, 11, 32, 32),
            Err(ClaimError::SlotBusy {
                holder: 1,
                holder_tag: 10,
                ..
            })
        ));
        assert!(matches!(
            ring.claim(1, 10, 60, 8),
            Err(ClaimError::OutOfSlot { .. })
        ));
        assert!(matches!(
            ring.commit(1, 0),
            Err(ClaimError::NotCommittable { .. })
        ));
        assert!(matches!(
            ring.commit(2, 0),
            Err(ClaimError::NotCommittable { .. })
        ));
        // While being written, readers see nothing of image 1.
        assert!(reader.read(1, |_, _| ()).is_err());
        // A finished part still holds the slot for image 1: another image cannot take it.
        drop(a);
        assert!(matches!(
            ring.claim(5, 11, 0, 8),
            Err(ClaimError::SlotBusy { holder: 1, .. })
        ));
        // A released range may be claimed again (a resent part), then the image commits.
        let mut again = ring.claim(1, 10, 0, 32).unwrap();
        again.data_mut().fill(8);
        drop(again);
        let mut rest = ring.claim(1, 10, 32, 32).unwrap();
        rest.data_mut().fill(9);
        drop(rest);
        ring.commit(1, 11).unwrap();
        let data = reader.read(1, |_, d| d[..64].to_vec()).unwrap();
        assert_eq!(&data[..32], &[8; 32]);
        assert_eq!(&data[32..], &[9; 32]);
        // Committed: the slot may now take image 5, which overwrites image 1 for readers.
        let b = ring.claim(5, 11, 0, 64).unwrap();
        assert!(reader.read(1, |_, _| ()).is_err());
        // Abandoning leaves live parts alone, then empties the slot once they are gone.
        assert_eq!(ring.abandon_unfinished(), 0);
        drop(b);
        assert_eq!(ring.abandon_unfinished(), 1);
        assert_eq!(reader.read(5, |_, _| ()), Err(ReadError::NotPresent));
        let _c = ring.claim(9, 12, 0, 8).unwrap();
    }
}
