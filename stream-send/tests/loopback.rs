//! In-process replication over 127.0.0.1: a test "assembler" (RingOwner + XPUB) on the near side,
//! `sender::run` and `receiver::run` on their own threads, and a SUB plus a RingReader on the far
//! side that check every published image's metadata and pixel bytes.
//!
//! Images carry the assembler's end-to-end checksum (`checksum::image_checksum` of the bytes
//! written into the near slot, as the assembler computes it), except in the fallback test.
//!
//! A small TCP proxy between sender and receiver can flip one payload byte (checksum tests) or
//! cut the link and restore it (outage test). Nothing here sleeps to synchronise: the far SUB's
//! messages, the XPUB's subscription message and the run functions' return values are the
//! synchronisation points; timeouts are watchdogs only.
#![allow(clippy::unwrap_used)]

use image_buffer::{Expect, RingOwner, RingReader};
use std::io::{Read, Write};
use std::net::{Shutdown as NetShutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;
use std_daq_common::checksum::{image_checksum, CHECKSUM_NONE, CHECKSUM_XXH3_BLOCKS};
use std_daq_common::service::Shutdown;
use std_daq_common::{ImageMetadata, ImageStatus};
use stream_send::receiver::{self, ReceiverOptions, ReceiverStats};
use stream_send::sender::{self, SenderOptions, SenderStats};
use stream_send::wire::Trailer;
use stream_send::wire::{FrameHeader, Kind};

const HEIGHT: u32 = 800;
/// Odd: 529 600-byte images, two 256 KiB checksum blocks and a short third one (5312 B), so
/// parts hold whole blocks, a short last block, or (4 parts) nothing.
const WIDTH: u32 = 331;
const IMAGE_BYTES: u64 = (HEIGHT * WIDTH * 2) as u64;
const WATCHDOG: Duration = Duration::from_secs(30);
const BLOCK: usize = std_daq_common::checksum::BLOCK_BYTES;

fn pixel(id: u64, i: usize) -> u8 {
    (id.wrapping_mul(31).wrapping_add(i as u64 * 7) % 251) as u8
}

fn pixels(id: u64) -> Vec<u8> {
    (0..IMAGE_BYTES as usize).map(|i| pixel(id, i)).collect()
}

/// The metadata the test assembler gives image `id`: with the assembler's checksum of its
/// pixels, or (`checksums` false, an older producer) none.
fn meta_of(id: u64, checksums: bool) -> ImageMetadata {
    let (checksum, checksum_kind) = if checksums {
        (image_checksum(&pixels(id)), CHECKSUM_XXH3_BLOCKS)
    } else {
        (0, CHECKSUM_NONE)
    };
    ImageMetadata {
        checksum,
        checksum_kind,
        image_id: id,
        frame_index: id + 1000,
        timestamp: id * 3,
        data_bytes: IMAGE_BYTES,
        height: HEIGHT,
        width: WIDTH,
        missing_packets: (id % 3) as u32,
        n_modules: 1,
        dtype: 2,
        status: match id % 3 {
            0 => 1,
            _ => 2,
        },
        version: std_daq_common::messages::IMAGE_METADATA_VERSION,
        ..bytemuck::Zeroable::zeroed()
    }
}

/// The near host: its ring and XPUB (an XPUB tells us when the sender has subscribed).
struct Near {
    ring: RingOwner<ImageMetadata>,
    xpub: zmq::Socket,
    checksums: bool,
}

impl Near {
    /// Writes image `id` into its slot with its metadata (and checksum), as an assembler does.
    fn write(&mut self, id: u64) {
        self.write_then(id, |_| {});
    }
    /// Like `write`, then `damage` changes the slot's bytes after the checksum was computed.
    fn write_then(&mut self, id: u64, damage: impl FnOnce(&mut [u8])) {
        let meta = meta_of(id, self.checksums);
        let mut w = self.ring.begin_write(id).unwrap();
        let data = &mut w.data_mut()[..IMAGE_BYTES as usize];
        data.copy_from_slice(&pixels(id));
        damage(data);
        *w.meta_mut() = meta;
        w.commit();
    }
    fn publish(&self, id: u64) {
        self.xpub
            .send(meta_of(id, self.checksums).as_bytes(), 0)
            .unwrap();
    }
}

struct Harness {
    near: Near,
    far_sub: zmq::Socket,
    far_reader: RingReader<ImageMetadata>,
    lost_sub: zmq::Socket,
    send_shutdown: Shutdown,
    recv_shutdown: Shutdown,
    sender: thread::JoinHandle<SenderStats>,
    receiver: thread::JoinHandle<ReceiverStats>,
    _ctx: zmq::Context,
}

fn unique(tag: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "sst-{}-{}-{tag}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Starts receiver and sender; `via` lets the sender connect somewhere else (a proxy) given the
/// receiver's address.
fn start(
    tag: &str,
    near_slots: u64,
    connections: u16,
    parts: u16,
    via: impl FnOnce(SocketAddr) -> SocketAddr,
) -> Harness {
    start_with(tag, near_slots, 128, connections, parts, true, via)
}

/// `checksums`: whether the near "assembler" gives its images the end-to-end checksum.
fn start_with(
    tag: &str,
    near_slots: u64,
    far_slots: u64,
    connections: u16,
    parts: u16,
    checksums: bool,
    via: impl FnOnce(SocketAddr) -> SocketAddr,
) -> Harness {
    let name = unique(tag);
    let ctx = zmq::Context::new();
    let near_ring = RingOwner::create(&format!("{name}.near"), near_slots, IMAGE_BYTES).unwrap();
    let far_ring =
        RingOwner::<ImageMetadata>::create(&format!("{name}.far"), far_slots, IMAGE_BYTES)
            .unwrap()
            .into_shared();
    let far_reader = RingReader::attach(&format!("{name}.far"), Expect::default()).unwrap();
    let near_reader = Arc::new(
        RingReader::<ImageMetadata>::attach(&format!("{name}.near"), Expect::default()).unwrap(),
    );

    let xpub = ctx.socket(zmq::XPUB).unwrap();
    xpub.bind(&format!("inproc://{name}-near")).unwrap();
    let far_pub = ctx.socket(zmq::PUB).unwrap();
    far_pub.bind(&format!("inproc://{name}-far")).unwrap();
    let lost_pub = ctx.socket(zmq::PUB).unwrap();
    lost_pub.bind(&format!("inproc://{name}-lost")).unwrap();
    let far_sub = ctx.socket(zmq::SUB).unwrap();
    far_sub.set_subscribe(b"").unwrap();
    far_sub.set_rcvtimeo(WATCHDOG.as_millis() as i32).unwrap();
    far_sub.connect(&format!("inproc://{name}-far")).unwrap();
    let lost_sub = ctx.socket(zmq::SUB).unwrap();
    lost_sub.set_subscribe(b"").unwrap();
    lost_sub.set_rcvtimeo(WATCHDOG.as_millis() as i32).unwrap();
    lost_sub.connect(&format!("inproc://{name}-lost")).unwrap();
    let sub = ctx.socket(zmq::SUB).unwrap();
    sub.set_subscribe(b"").unwrap();
    sub.connect(&format!("inproc://{name}-near")).unwrap();
    // The sender's subscription has reached the near publisher.
    xpub.set_rcvtimeo(WATCHDOG.as_millis() as i32).unwrap();
    assert_eq!(xpub.recv_bytes(0).unwrap(), [1u8]);

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let target = via(listener.local_addr().unwrap());
    let recv_opts = ReceiverOptions {
        image_bytes: IMAGE_BYTES,
        height: HEIGHT,
        width: WIDTH,
        dtype: 2,
        link_timeout: Duration::from_millis(1500),
        stats_period: Duration::from_secs(60),
        status: Default::default(),
    };
    let recv_shutdown = Shutdown::new();
    let receiver = {
        let s = recv_shutdown.clone();
        thread::spawn(move || receiver::run(listener, &far_ring, &far_pub, &recv_opts, &s).unwrap())
    };
    // The receiver's PUB heartbeat reached the far SUB: it is subscribed.
    assert!(far_sub.recv_bytes(0).unwrap().is_empty());
    let lost_ready = lost_sub.get_fd().is_ok();
    assert!(lost_ready);

    let send_opts = SenderOptions {
        target,
        connections,
        parts,
        image_bytes: IMAGE_BYTES,
        height: HEIGHT,
        width: WIDTH,
        dtype: 2,
        link_timeout: Duration::from_millis(1500),
        stats_period: Duration::from_secs(60),
        status: Default::default(),
        drain_timeout: WATCHDOG,
    };
    let send_shutdown = Shutdown::new();
    let sender = {
        let s = send_shutdown.clone();
        thread::spawn(move || {
            let lost_pub = lost_pub;
            sender::run(&send_opts, &sub, near_reader, Some(&lost_pub), &s).unwrap()
        })
    };
    Harness {
        near: Near {
            ring: near_ring,
            xpub,
            checksums,
        },
        far_sub,
        far_reader,
        lost_sub,
        send_shutdown,
        recv_shutdown,
        sender,
        receiver,
        _ctx: ctx,
    }
}

impl Harness {
    /// The next non-heartbeat ImageMetadata the far side published.
    fn next_far(&self) -> ImageMetadata {
        loop {
            let m = self
                .far_sub
                .recv_bytes(0)
                .expect("far side published nothing");
            if !m.is_empty() {
                return ImageMetadata::from_bytes(&m).unwrap();
            }
        }
    }

    /// Checks that the far side publishes `id` next, intact, without looking at its pixels.
    fn expect_far_meta(&self, id: u64) {
        assert_eq!(self.next_far(), self.meta(id), "image {id}");
    }

    fn meta(&self, id: u64) -> ImageMetadata {
        meta_of(id, self.near.checksums)
    }

    /// Checks that the far ring holds `id` with exact pixels.
    fn expect_far_pixels(&self, id: u64) {
        self.far_reader
            .read(id, |meta, data| {
                assert_eq!(*meta, self.meta(id));
                let data = &data[..IMAGE_BYTES as usize];
                let bad = data.iter().enumerate().find(|(i, b)| **b != pixel(id, *i));
                assert!(bad.is_none(), "image {id}: byte {bad:?} differs");
            })
            .unwrap();
    }

    /// Checks that the far side publishes `id` next: identical metadata and exact pixels, or (if
    /// `lost`) status LostInBuffer and zero pixels.
    fn expect_far(&self, id: u64, lost: bool) {
        if !lost {
            self.expect_far_meta(id);
            return self.expect_far_pixels(id);
        }
        // Zero pixels: published without the assembler's checksum, which described others.
        let mut want = self.meta(id);
        want.status = ImageStatus::LostInBuffer as u16;
        (want.checksum, want.checksum_kind) = (0, CHECKSUM_NONE);
        assert_eq!(self.next_far(), want, "image {id}");
        self.far_reader
            .read(id, |meta, data| {
                assert_eq!(*meta, want);
                let data = &data[..IMAGE_BYTES as usize];
                assert!(data.iter().all(|b| *b == 0), "lost image {id} not zeroed");
            })
            .unwrap();
    }

    fn stop(self) -> (SenderStats, ReceiverStats) {
        self.send_shutdown.trigger();
        let s = self.sender.join().unwrap();
        self.recv_shutdown.trigger();
        let r = self.receiver.join().unwrap();
        (s, r)
    }
}

fn exact_replication(connections: u16, parts: u16) {
    let mut h = start("exact", 64, connections, parts, |a| a);
    for id in 1..=300u64 {
        h.near.write(id);
        h.near.publish(id);
        // Never more than half the ring ahead of the far side: nothing may be lost here.
        if id > 32 {
            h.expect_far(id - 32, false);
        }
    }
    for id in 269..=300 {
        h.expect_far(id, false);
    }
    let (s, r) = h.stop();
    assert_eq!(
        (s.images_queued, s.images_delivered, s.images_lost),
        (300, 300, 0)
    );
    assert_eq!(s.images_unconfirmed, 0);
    assert_eq!(
        (r.images_delivered, r.images_lost, r.checksum_errors),
        (300, 0, 0)
    );
    assert_eq!(r.sessions, 1);
    // Every image carried the assembler's checksum: the sender hashed nothing itself.
    assert_eq!(s.images_without_checksum, 0);
}

#[test]
fn one_connection_whole_images_are_exact() {
    exact_replication(1, 1);
}

#[test]
fn whole_images_spread_over_three_connections_stay_in_order() {
    exact_replication(3, 1);
}

#[test]
fn images_split_in_four_parts_over_two_connections_are_exact() {
    // Three blocks in four parts: part 0 is empty, part 3 holds the short last block.
    exact_replication(2, 4);
}

#[test]
fn images_split_in_two_parts_over_three_connections_are_exact() {
    // One block, then two (the short last one among them), on rotating connections.
    exact_replication(3, 2);
}

#[test]
fn a_far_ring_smaller_than_the_images_in_flight_waits_and_loses_nothing() {
    // 3 far slots, 3 connections, whole images: connection c carries ids c+1, c+4, ..., all in
    // slot (c+1) % 3, so each reader claims a slot whose previous image may not be committed yet
    // (parts are received straight into the slot): it must wait, not overwrite it or fail.
    let mut h = start_with("small-far", 64, 3, 3, 1, true, |a| a);
    for burst in 0..20u64 {
        let first = burst * 5 + 1;
        for id in first..first + 5 {
            h.near.write(id);
            h.near.publish(id);
        }
        for id in first..first + 5 {
            h.expect_far_meta(id);
        }
        // The last three are still in the 3-slot ring.
        for id in first + 2..first + 5 {
            h.expect_far_pixels(id);
        }
    }
    let (s, r) = h.stop();
    assert_eq!((s.images_delivered, s.images_lost), (100, 0));
    assert_eq!(
        (
            r.images_delivered,
            r.images_lost,
            r.checksum_errors,
            r.sessions
        ),
        (100, 0, 0, 1)
    );
}

#[test]
fn overwritten_images_are_reported_lost_on_both_sides() {
    // A 16-slot ring and 64 images written before the sender sees any: 1..=48 are gone.
    let mut h = start("lost", 16, 2, 1, |a| a);
    for id in 1..=64 {
        h.near.write(id);
    }
    for id in 1..=64 {
        h.near.publish(id);
    }
    for id in 1..=64 {
        h.expect_far(id, id <= 48);
    }
    // The sender side publishes each lost image, once confirmed, with its metadata and status 4.
    for id in 1..=48 {
        let m = ImageMetadata::from_bytes(&h.lost_sub.recv_bytes(0).unwrap()).unwrap();
        let mut want = h.meta(id);
        want.status = ImageStatus::LostInBuffer as u16;
        assert_eq!(m, want);
    }
    let (s, r) = h.stop();
    assert_eq!((s.images_delivered, s.images_lost), (16, 48));
    assert_eq!((r.images_delivered, r.images_lost), (16, 48));
}

/// A TCP proxy between sender and receiver that parses the sender's frames: it can flip one
/// payload byte of one image, and cut (close every connection, refuse new ones) and restore the
/// link.
struct Proxy {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    /// Image frames seen, and those among them whose trailer carried a payload checksum.
    frames: Arc<FrameCounts>,
}

#[derive(Default)]
struct FrameCounts {
    image_frames: AtomicU64,
    hashed_by_sender: AtomicU64,
}

/// Which byte the proxy flips: in the payload of the first Image frame of `image` whose payload
/// is at least `at + 1` bytes long, the byte `at` (usize::MAX: the payload's last byte).
#[derive(Clone, Copy)]
struct Corrupt {
    image: u64,
    at: usize,
}

impl Proxy {
    fn start(upstream: SocketAddr, corrupt: Option<Corrupt>) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(Mutex::new(Vec::new()));
        let frames = Arc::new(FrameCounts::default());
        let corrupted = Arc::new(AtomicBool::new(false));
        let (cut2, conns2, frames2) = (Arc::clone(&cut), Arc::clone(&conns), Arc::clone(&frames));
        thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                if cut2.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue;
                };
                {
                    let mut c = conns2.lock().unwrap();
                    c.push(client.try_clone().unwrap());
                    c.push(server.try_clone().unwrap());
                }
                let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                thread::spawn(move || {
                    let _ = std::io::copy(&mut s2, &mut c2);
                    let _ = c2.shutdown(NetShutdown::Both);
                });
                let (corrupted, frames) = (Arc::clone(&corrupted), Arc::clone(&frames2));
                thread::spawn(move || {
                    let _ = forward_frames(client, server, corrupt, &corrupted, &frames);
                });
            }
        });
        Proxy {
            addr,
            cut,
            conns,
            frames,
        }
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(NetShutdown::Both);
        }
    }

    fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

fn forward_frames(
    mut from: TcpStream,
    mut to: TcpStream,
    corrupt: Option<Corrupt>,
    corrupted: &AtomicBool,
    frames: &FrameCounts,
) -> std::io::Result<()> {
    let mut hello = [0u8; 56];
    from.read_exact(&mut hello)?;
    to.write_all(&hello)?;
    let mut hb = [0u8; stream_send::wire::FRAME_HEADER_BYTES];
    let mut payload = Vec::new();
    loop {
        from.read_exact(&mut hb)?;
        to.write_all(&hb)?;
        let h: FrameHeader = bytemuck::pod_read_unaligned(&hb);
        if h.kind != Kind::Image as u16 {
            continue;
        }
        let len = h.payload_len as usize;
        payload.resize(len + std::mem::size_of::<Trailer>(), 0);
        from.read_exact(&mut payload)?;
        if let Some(c) = corrupt {
            let at = c.at.min(len.saturating_sub(1));
            if h.image_id == c.image && len > at && !corrupted.swap(true, Ordering::SeqCst) {
                payload[at] ^= 0x10;
            }
        }
        let t: Trailer = bytemuck::pod_read_unaligned(&payload[len..]);
        frames.image_frames.fetch_add(1, Ordering::SeqCst);
        if t.checksum != 0 {
            frames.hashed_by_sender.fetch_add(1, Ordering::SeqCst);
        }
        to.write_all(&payload)?;
    }
}

/// Starts a harness whose sender connects through a proxy (kept, to read its counts).
fn start_via_proxy(
    tag: &str,
    connections: u16,
    parts: u16,
    checksums: bool,
    corrupt: Option<Corrupt>,
) -> (Harness, Proxy) {
    let proxy = Arc::new(Mutex::new(None::<Proxy>));
    let p2 = Arc::clone(&proxy);
    let h = start_with(tag, 64, 128, connections, parts, checksums, move |a| {
        let p = Proxy::start(a, corrupt);
        let addr = p.addr;
        *p2.lock().unwrap() = Some(p);
        addr
    });
    let p = proxy.lock().unwrap().take().unwrap();
    (h, p)
}

/// Ten images through a proxy that flips one byte of image 5 on the wire (`corrupt.at` of the
/// first of its parts long enough): image 5 is published lost with zero pixels, never as good;
/// the other nine arrive exact; both sides count one checksum error.
fn a_flipped_byte_is_caught(tag: &str, connections: u16, parts: u16, checksums: bool, at: usize) {
    let corrupt = Corrupt { image: 5, at };
    let (mut h, proxy) = start_via_proxy(tag, connections, parts, checksums, Some(corrupt));
    for id in 1..=10 {
        h.near.write(id);
        h.near.publish(id);
    }
    for id in 1..=10 {
        h.expect_far(id, id == 5);
    }
    let (s, r) = h.stop();
    assert_eq!(r.checksum_errors, 1);
    assert_eq!((r.images_delivered, r.images_lost), (9, 0));
    // The sender learns of it through the acknowledgements.
    assert_eq!(s.receiver_checksum_errors, 1);
    assert_eq!(s.images_delivered + s.images_lost, 10);
    let frames = proxy.frames.image_frames.load(Ordering::SeqCst);
    let hashed = proxy.frames.hashed_by_sender.load(Ordering::SeqCst);
    assert_eq!(frames, 10 * u64::from(parts));
    if checksums {
        // Caught by the assembler's checksum: the sender hashed no payload.
        assert_eq!((s.images_without_checksum, hashed), (0, 0));
    } else {
        // The fallback: the sender hashed every part itself.
        assert_eq!((s.images_without_checksum, hashed), (10, frames));
    }
}

#[test]
fn a_byte_flipped_on_the_wire_is_caught_by_the_assembler_checksum() {
    a_flipped_byte_is_caught("crc", 2, 2, true, 77);
}

#[test]
fn a_byte_flipped_in_a_later_block_of_a_part_is_caught() {
    // Whole images on one connection: the payload's last byte is in the short third block.
    a_flipped_byte_is_caught("crc-last", 1, 1, true, usize::MAX);
}

#[test]
fn a_byte_flipped_in_four_parts_with_an_empty_one_is_caught() {
    a_flipped_byte_is_caught("crc-4", 2, 4, true, usize::MAX);
}

#[test]
fn without_the_assembler_checksum_the_sender_hashes_and_a_flip_is_still_caught() {
    a_flipped_byte_is_caught("crc-none", 2, 2, false, 77);
}

#[test]
fn a_slot_damaged_after_the_assembler_checksummed_it_is_never_published_good() {
    // The checksum is end to end: bytes that changed in the near slot after the assembler
    // computed it (memory, a stray writer) are caught at the far end, not sent on as good.
    let mut h = start("damaged", 64, 2, 2, |a| a);
    for id in 1..=10 {
        if id == 7 {
            h.near.write_then(id, |d| d[BLOCK + 3] ^= 1);
        } else {
            h.near.write(id);
        }
        h.near.publish(id);
    }
    for id in 1..=10 {
        h.expect_far(id, id == 7);
    }
    let (s, r) = h.stop();
    assert_eq!((r.checksum_errors, r.images_delivered), (1, 9));
    assert_eq!(s.receiver_checksum_errors, 1);
}

#[test]
fn a_cut_link_reconnects_and_accounts_every_image() {
    let proxy = Arc::new(Mutex::new(None::<Proxy>));
    let p2 = Arc::clone(&proxy);
    let mut h = start("cut", 16, 2, 1, move |a| {
        let p = Proxy::start(a, None);
        let addr = p.addr;
        *p2.lock().unwrap() = Some(p);
        addr
    });
    let proxy = proxy.lock().unwrap().take().unwrap();
    for id in 1..=20 {
        h.near.write(id);
        h.near.publish(id);
        h.expect_far(id, false);
    }
    proxy.cut();
    // While the link is down the ring laps: 21..=44 are overwritten by 45..=60.
    for id in 21..=60 {
        h.near.write(id);
        h.near.publish(id);
    }
    proxy.restore();
    for id in 21..=60 {
        h.expect_far(id, id <= 44);
    }
    let (s, r) = h.stop();
    assert_eq!((s.images_delivered, s.images_lost), (36, 24));
    assert_eq!((r.images_delivered, r.images_lost), (36, 24));
    assert_eq!(s.images_unconfirmed, 0);
    assert!(s.sessions >= 2 && r.sessions >= 2, "{s:?} {r:?}");
}
