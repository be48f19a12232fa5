//! The seqlock under real concurrency: a writer thread laps a slow reader thread (each with its
//! own mapping) on a small ring, and no torn or overwritten image may ever be reported good.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;

use bytemuck::{Pod, Zeroable};
use image_buffer::{Expect, ReadError, RingOwner, RingReader};

const N_SLOTS: u64 = 4;
const SLOT_BYTES: u64 = 64 * 1024;
const NONE_YET: u64 = u64::MAX;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
struct Meta {
    image_id: u64,
    inverted_id: u64,
}

impl Meta {
    fn of(image_id: u64) -> Meta {
        Meta {
            image_id,
            inverted_id: !image_id,
        }
    }
}

/// Word `i` of image `id` is `id ^ i`: distinct for every (id, i), so any mix of images shows.
fn word(image_id: u64, index: usize) -> u64 {
    image_id ^ index as u64
}

/// Checks every word, yielding now and then so the writer gets to lap us mid-read.
/// Never panics: during a read the bytes may legitimately be inconsistent.
fn is_image(image_id: u64, meta: &Meta, data: &[u8], slow: bool) -> bool {
    let words: &[u64] = bytemuck::cast_slice(data);
    let mut intact = *meta == Meta::of(image_id);
    for (index, &value) in words.iter().enumerate() {
        intact &= value == word(image_id, index);
        if slow && index % 1024 == 0 {
            thread::yield_now();
        }
    }
    intact
}

#[derive(Debug, Default)]
struct Tally {
    ok: u64,
    overwritten: u64,
    /// Overwritten although the slot held the image just before the read: lapped mid-read.
    lapped_mid_read: u64,
    torn: u64,
}

/// Runs the writer over `n_images` while `read_image` is hammered on recent and lagging ids.
/// `read_image` returns Ok(true) only for an image it verified as intact.
fn lap_reader(
    tag: &str,
    n_images: u64,
    read_image: impl Fn(&RingReader<Meta>, u64) -> Result<bool, ReadError>,
) -> Tally {
    let name = format!("ib-test.{}.lapping-{tag}", std::process::id());
    let mut owner = RingOwner::<Meta>::create(&name, N_SLOTS, SLOT_BYTES).unwrap();
    let reader = RingReader::<Meta>::attach(&name, Expect::default()).unwrap();
    let latest = Arc::new(AtomicU64::new(NONE_YET));
    let done = Arc::new(AtomicBool::new(false));

    let writer = {
        let (latest, done) = (latest.clone(), done.clone());
        thread::spawn(move || {
            for image_id in 0..n_images {
                let mut slot = owner.begin_write(image_id).unwrap();
                let words: &mut [u64] = bytemuck::cast_slice_mut(slot.data_mut());
                for (index, value) in words.iter_mut().enumerate() {
                    *value = word(image_id, index);
                }
                *slot.meta_mut() = Meta::of(image_id);
                slot.commit();
                latest.store(image_id, Ordering::Release);
            }
            done.store(true, Ordering::Release);
            owner
        })
    };

    let mut tally = Tally::default();
    let mut record =
        |image_id: u64, held_before: bool, result: Result<bool, ReadError>| match result {
            Ok(intact) => {
                assert!(
                    intact,
                    "image {image_id} reported good but its contents are not"
                );
                tally.ok += 1;
            }
            Err(ReadError::Overwritten { found_image_id }) => {
                assert_ne!(found_image_id, image_id);
                tally.overwritten += 1;
                tally.lapped_mid_read += u64::from(held_before);
            }
            Err(ReadError::Torn) => tally.torn += 1,
            // Every id we ask for was committed once and ids are never rewritten or abandoned.
            Err(err) => panic!("image {image_id}: unexpected {err:?}"),
        };
    while !done.load(Ordering::Acquire) {
        let newest = latest.load(Ordering::Acquire);
        if newest == NONE_YET {
            thread::yield_now();
            continue;
        }
        // Recent images, the one whose slot is written next, and one that is surely gone.
        for lag in [0, 1, 2, N_SLOTS - 1, N_SLOTS + 1] {
            let image_id = newest.saturating_sub(lag);
            let held_before = reader.check(image_id).is_ok();
            record(image_id, held_before, read_image(&reader, image_id));
        }
    }
    let owner = writer.join().unwrap();
    // Quiescent now: the last image must read back intact.
    record(n_images - 1, true, read_image(&reader, n_images - 1));
    drop(owner);

    println!("{tag}: {tally:?}");
    assert!(tally.ok > 0, "{tally:?}");
    assert!(
        tally.overwritten > 0,
        "the writer never lapped the reader: {tally:?}"
    );
    // Lapping shows as Overwritten; Torn is only for an id rewritten or abandoned, never done here.
    assert_eq!(tally.torn, 0, "{tally:?}");
    tally
}

#[test]
fn lapped_in_place_reads_never_pass_a_torn_image() {
    lap_reader("in-place", 20_000, |reader, image_id| {
        reader.read(image_id, |meta, data| is_image(image_id, meta, data, true))
    });
}

#[test]
fn lapped_copies_are_only_trusted_when_ok() {
    lap_reader("copy-to-vec", 10_000, |reader, image_id| {
        reader
            .read(image_id, |meta, data| (*meta, data.to_vec()))
            .map(|(meta, data)| is_image(image_id, &meta, &data, false))
    });
}

#[test]
fn lapped_copy_out_is_only_trusted_when_ok() {
    lap_reader("copy-out", 10_000, |reader, image_id| {
        // u64 storage keeps the buffer 8-byte aligned for the word check.
        let mut buffer = vec![0u64; SLOT_BYTES as usize / 8];
        reader
            .copy_out(image_id, bytemuck::cast_slice_mut(&mut buffer))
            .map(|meta| is_image(image_id, &meta, bytemuck::cast_slice(&buffer), false))
    });
}

/// Deterministic lap: f itself waits until the writer has reused the slot, so the re-check
/// after f must fail even though the slot held the image when f started.
#[test]
fn a_lap_during_the_read_is_always_caught() {
    let name = format!("ib-test.{}.lapping-during", std::process::id());
    let mut owner = RingOwner::<Meta>::create(&name, N_SLOTS, SLOT_BYTES).unwrap();
    let reader = RingReader::<Meta>::attach(&name, Expect::default()).unwrap();
    let latest = Arc::new(AtomicU64::new(NONE_YET));
    let go = Arc::new(AtomicBool::new(false));

    let writer = {
        let (latest, go) = (latest.clone(), go.clone());
        thread::spawn(move || {
            for image_id in 0..100 {
                while image_id == 1 && !go.load(Ordering::Acquire) {
                    thread::yield_now();
                }
                let mut slot = owner.begin_write(image_id).unwrap();
                slot.data_mut().fill(image_id as u8);
                *slot.meta_mut() = Meta::of(image_id);
                slot.commit();
                latest.store(image_id, Ordering::Release);
            }
        })
    };
    while latest.load(Ordering::Acquire) == NONE_YET {
        thread::yield_now();
    }
    let result = reader.read(0, |meta, data| {
        let seen = (*meta, data[0]);
        go.store(true, Ordering::Release);
        while latest.load(Ordering::Acquire) < N_SLOTS {
            thread::yield_now();
        }
        seen
    });
    writer.join().unwrap();
    match result {
        Err(ReadError::Overwritten { found_image_id }) => assert!(found_image_id >= N_SLOTS),
        other => panic!("expected Overwritten, got {other:?}"),
    }
}
