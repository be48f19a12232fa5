//! Garbage on every socket the pipeline listens on (reliability issue, item 9): random UDP
//! datagrams on the receivers' ports, junk ZMQ messages on the assembler's module-frame socket,
//! junk commands on the writer's command socket, junk bytes on every metrics port. Nothing
//! crashes, every piece of junk is counted by the service that got it (or answered with an
//! error), and the next run is exact. (Junk AMQP bodies: writer-agent/tests; junk on the
//! replication port: stream-send/tests.)
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::io::Write;
use std::net::{TcpStream, UdpSocket};
use std::time::{Duration, Instant};
use std_daq::pipeline::{Pipeline, SimulatedDetector};
use std_daq_common::names;
use std_daq_tests::{free_port, next_run_completes_exact, options, scrape_metrics};

const UDP_JUNK: u64 = 500;
const ZMQ_JUNK: u64 = 300;

/// A small deterministic generator (xorshift), so a failure can be replayed.
struct Junk(u64);

impl Junk {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

/// Waits (watchdog 30 s) until metric `name` on `port` reaches `want`, and checks it stays there.
fn wait_for_count(port: u16, name: &str, want: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = scrape_metrics(port)
            .unwrap()
            .get(name)
            .map_or(0, |v| *v as u64);
        assert!(
            got <= want,
            "{name} on :{port} is {got}, more than the {want} sent"
        );
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} on :{port} is {got}, want {want}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn junk_on_every_socket_is_counted_and_the_next_run_is_exact() {
    let opts = options("garbage").unwrap();
    let work = opts.work_dir.clone();
    let detector = opts.detector_name.clone();
    let services = [
        "std-udp-recv-0",
        "std-udp-recv-1",
        "std-assembler",
        "std-h5-writer",
    ];
    let ports: Vec<u16> = services.iter().map(|_| free_port().unwrap()).collect();
    let extra: HashMap<String, Vec<String>> = services
        .iter()
        .zip(&ports)
        .map(|(s, p)| {
            (
                s.to_string(),
                vec!["--metrics-addr".into(), format!("127.0.0.1:{p}")],
            )
        })
        .collect();
    let mut p = Pipeline::start_with_args(
        opts,
        SimulatedDetector::Jungfrau,
        Duration::from_secs(60),
        extra,
    )
    .unwrap();
    let mut junk = Junk(0x5eed_0000_0000_0001);

    // 1. Random datagrams of every size but the real packet's (8240), the empty one included.
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    for m in 0..2u16 {
        let port = p.config.udp_port(m);
        for _ in 0..UDP_JUNK {
            let mut len = (junk.next() % 9000) as usize;
            if len == 8240 {
                len = 8239;
            }
            udp.send_to(&junk.bytes(len), ("127.0.0.1", port)).unwrap();
        }
    }
    wait_for_count(ports[0], "std_daq_malformed_packets", UDP_JUNK);
    wait_for_count(ports[1], "std_daq_malformed_packets", UDP_JUNK);

    // 2. Junk on the assembler's module-frame socket: any size, and the right size (80 bytes)
    //    with a version this build does not speak.
    let ctx = zmq::Context::new();
    let push = ctx.socket(zmq::PUSH).unwrap();
    push.set_linger(5000).unwrap();
    push.connect(&names::sync_endpoint(&p.config)).unwrap();
    for k in 0..ZMQ_JUNK {
        let mut msg = if k % 3 == 0 {
            junk.bytes(80)
        } else {
            let mut len = (junk.next() % 300) as usize;
            if len == 80 {
                len = 81;
            }
            junk.bytes(len)
        };
        if msg.len() == 80 {
            // The version field (bytes 46..48) set to one that does not exist.
            msg[46..48].copy_from_slice(&0xbeefu16.to_le_bytes());
        }
        push.send(msg, 0).unwrap();
    }
    // And one that is well-formed but lies: a frame module 0's FrameBuffer never held, far in
    // the future (taken as real, it would make every real frame after it "late").
    let forged = std_daq_common::ModuleFrame::new(1_000_000_000_000, 0, 128);
    push.send(forged.as_bytes(), 0).unwrap();
    drop(push);
    wait_for_count(ports[2], "std_daq_invalid_messages", ZMQ_JUNK + 1);

    // 3. Junk commands: each answered with an error, the writer keeps serving.
    let req = ctx.socket(zmq::REQ).unwrap();
    req.set_rcvtimeo(5000).unwrap();
    req.connect(&names::writer_command_endpoint(&p.config))
        .unwrap();
    for len in [0usize, 1, 7, 100, 5000] {
        req.send(junk.bytes(len), 0).unwrap();
        let reply: serde_json::Value = serde_json::from_slice(&req.recv_bytes(0).unwrap()).unwrap();
        assert_eq!(reply["ok"], false, "{reply}");
        let error = reply["error"].as_str().unwrap();
        assert!(error.starts_with("invalid command: "), "{error}");
    }
    drop(req);

    // 4. Junk bytes on every metrics port; each still answers a real scrape afterwards.
    for &port in &ports {
        for len in [1usize, 64, 4096, 70_000] {
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
                let _ = s.write_all(&junk.bytes(len));
            }
        }
        assert!(!scrape_metrics(port).unwrap().is_empty());
    }

    eprintln!(
        "FIGURES | junk | {UDP_JUNK} random datagrams per receiver: {UDP_JUNK} malformed counted \
         each | {ZMQ_JUNK} junk ZMQ messages + 1 well-formed forged ModuleFrame: {} invalid counted by \
         the assembler | 5 junk \
         commands: 5 error replies | 16 junk TCP connections to metrics ports: served after | \
         next run 20/20 exact |",
        ZMQ_JUNK + 1
    );
    // Every service is still up, and the next run is exact.
    p.check_alive().unwrap();
    next_run_completes_exact(p, &work.join("after-junk.h5"), &detector).unwrap();
    std::fs::remove_dir_all(work).unwrap();
}
