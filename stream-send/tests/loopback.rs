//! In-process replication over 127.0.0.1: a test "assembler" (RingOwner + XPUB) on the near side,
//! `sender::run` and `receiver::run` on their own threads, and a SUB plus a RingReader on the far
//! side that check every published image's metadata and pixel bytes.
//!
//! A small TCP proxy between sender and receiver can flip one payload byte (checksum test) or
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
use std_daq_common::service::Shutdown;
use std_daq_common::{ImageMetadata, ImageStatus};
use stream_send::receiver::{self, ReceiverOptions, ReceiverStats};
use stream_send::sender::{self, SenderOptions, SenderStats};
use stream_send::wire::Trailer;
use stream_send::wire::{FrameHeader, Kind};

const HEIGHT: u32 = 100;
const WIDTH: u32 = 331; // odd, so parts do not fall on nice boundaries
const IMAGE_BYTES: u64 = (HEIGHT * WIDTH * 2) as u64;
const WATCHDOG: Duration = Duration::from_secs(30);

fn pixel(id: u64, i: usize) -> u8 {
    (id.wrapping_mul(31).wrapping_add(i as u64 * 7) % 251) as u8
}

fn meta_of(id: u64) -> ImageMetadata {
    ImageMetadata {
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
}

impl Near {
    fn write(&mut self, id: u64) {
        let mut w = self.ring.begin_write(id).unwrap();
        for (i, b) in w.data_mut()[..IMAGE_BYTES as usize].iter_mut().enumerate() {
            *b = pixel(id, i);
        }
        *w.meta_mut() = meta_of(id);
        w.commit();
    }
    fn publish(&self, id: u64) {
        self.xpub.send(meta_of(id).as_bytes(), 0).unwrap();
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
    start_with_far_slots(tag, near_slots, 512, connections, parts, via)
}

fn start_with_far_slots(
    tag: &str,
    near_slots: u64,
    far_slots: u64,
    connections: u16,
    parts: u16,
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
        assert_eq!(self.next_far(), meta_of(id), "image {id}");
    }

    /// Checks that the far ring holds `id` with exact pixels.
    fn expect_far_pixels(&self, id: u64) {
        self.far_reader
            .read(id, |meta, data| {
                assert_eq!(*meta, meta_of(id));
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
        let mut want = meta_of(id);
        want.status = ImageStatus::LostInBuffer as u16;
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
    exact_replication(2, 4);
}

#[test]
fn a_far_ring_smaller_than_the_images_in_flight_waits_and_loses_nothing() {
    // 3 far slots, 3 connections, whole images: connection c carries ids c+1, c+4, ..., all in
    // slot (c+1) % 3, so each reader claims a slot whose previous image may not be committed yet
    // (parts are received straight into the slot): it must wait, not overwrite it or fail.
    let mut h = start_with_far_slots("small-far", 64, 3, 3, 1, |a| a);
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
        let mut want = meta_of(id);
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
}

impl Proxy {
    fn start(upstream: SocketAddr, corrupt_image: Option<u64>) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(Mutex::new(Vec::new()));
        let corrupted = Arc::new(AtomicBool::new(false));
        let (cut2, conns2) = (Arc::clone(&cut), Arc::clone(&conns));
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
                let corrupted = Arc::clone(&corrupted);
                thread::spawn(move || {
                    let _ = forward_frames(client, server, corrupt_image, &corrupted);
                });
            }
        });
        Proxy { addr, cut, conns }
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
    corrupt_image: Option<u64>,
    corrupted: &AtomicBool,
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
        payload.resize(h.payload_len as usize + std::mem::size_of::<Trailer>(), 0);
        from.read_exact(&mut payload)?;
        if Some(h.image_id) == corrupt_image
            && h.payload_len > 100
            && !corrupted.swap(true, Ordering::SeqCst)
        {
            payload[77] ^= 0x10;
        }
        to.write_all(&payload)?;
    }
}

#[test]
fn a_byte_flipped_on_the_wire_is_caught_by_the_checksum() {
    let mut h = start("crc", 64, 2, 2, |a| Proxy::start(a, Some(5)).addr);
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
