//! Latency inside and between shaped classes: a 1-byte request/response probe on its own TCP
//! connection (with a known local port, so the planner can put it in a class), measured idle and
//! while iperf3 saturates a class. Shared by the latency benchmark and the rate tests.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use shaper::policy::{ClassSet, Decision};
use shaper::scan::{Proto, Socket};

use super::netns::NetnsPair;
use super::shaping::{Shaper, flow};
use super::traffic::{Result as IperfResult, Run, Server};

/// The probe's port on `b`, and its local port on `a`.
pub const PROBE_PORT: u16 = 7007;
pub const PROBE_LOCAL_PORT: u16 = 42000;
/// The iperf3 server's port; its data connections use consecutive local ports from this one.
pub const BULK_PORT: u16 = 5701;
pub const BULK_LOCAL_PORT: u16 = 41000;

/// A connected request/response probe: `a` sends one byte, `b` answers with one.
pub struct RrProbe {
    stream: TcpStream,
}

impl RrProbe {
    /// Starts an echo server in `b` and connects to it from `a`'s port [`PROBE_LOCAL_PORT`].
    pub fn connect(pair: &NetnsPair) -> RrProbe {
        let server = SocketAddr::new(NetnsPair::b_addr(4), PROBE_PORT);
        let listener = pair
            .b
            .run(|| TcpListener::bind(server).expect("bind the probe server"));
        std::thread::spawn(move || {
            let Ok((mut s, _)) = listener.accept() else {
                return;
            };
            let _ = s.set_nodelay(true);
            let mut byte = [0u8; 1];
            while s.read_exact(&mut byte).is_ok() {
                if s.write_all(&byte).is_err() {
                    break;
                }
            }
        });
        let stream = pair.a.run(|| {
            use socket2::{Domain, Socket as Sock, Type};
            let s = Sock::new(Domain::IPV4, Type::STREAM, None).unwrap();
            s.set_reuse_address(true).unwrap();
            s.bind(&SocketAddr::new(NetnsPair::a_addr(4), PROBE_LOCAL_PORT).into())
                .expect("bind the probe's local port");
            s.connect(&server.into()).expect("connect the probe");
            TcpStream::from(s)
        });
        stream.set_nodelay(true).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        RrProbe { stream }
    }

    /// The probe's connection as the scanner would report it (for the planner's filters).
    pub fn socket() -> Socket {
        flow(Proto::Tcp, 4, PROBE_LOCAL_PORT, PROBE_PORT, 900)
    }

    /// Round trips every 50 ms for `length`: each one's time, sorted.
    pub fn measure(&mut self, length: Duration) -> Rtts {
        let mut rtts = Vec::new();
        let end = Instant::now() + length;
        let mut byte = [0x5a_u8; 1];
        while Instant::now() < end {
            let start = Instant::now();
            self.stream.write_all(&byte).expect("probe request");
            self.stream.read_exact(&mut byte).expect("probe answer");
            let rtt = start.elapsed();
            rtts.push(rtt);
            std::thread::sleep(Duration::from_millis(50).saturating_sub(rtt));
        }
        rtts.sort();
        Rtts(rtts)
    }
}

/// Sorted round-trip times.
#[derive(Debug, Clone)]
pub struct Rtts(pub Vec<Duration>);

impl Rtts {
    fn quantile(&self, q: f64) -> Duration {
        let n = self.0.len();
        assert!(n > 0, "no round trip completed");
        self.0[((n as f64 * q) as usize).min(n - 1)]
    }
    pub fn median(&self) -> Duration {
        self.quantile(0.5)
    }
    pub fn p95(&self) -> Duration {
        self.quantile(0.95)
    }
}

impl std::fmt::Display for Rtts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "median {:.1} ms, p95 {:.1} ms ({} round trips)",
            self.median().as_secs_f64() * 1e3,
            self.p95().as_secs_f64() * 1e3,
            self.0.len()
        )
    }
}

/// What [`probe_under_load`] measured.
pub struct LoadResult {
    pub idle: Rtts,
    pub loaded: Rtts,
    pub bulk: IperfResult,
    /// Each bulk flow's goodput at the receiver, bits per second.
    pub streams: Vec<f64>,
}

/// Shapes `pair.a` with `classes`, the probe in `probe_class` and `flows` iperf3 flows in
/// `bulk_class`, then measures the probe idle (2 s) and while the flows run (10 s of 14, upload
/// or download).
pub fn probe_under_load(
    pair: &NetnsPair,
    shaper: &mut Shaper,
    classes: &ClassSet,
    probe_class: Decision,
    bulk_class: Decision,
    flows: u16,
    download: bool,
) -> LoadResult {
    let mut planned: Vec<(Socket, Decision)> = vec![(RrProbe::socket(), probe_class)];
    for i in 0..flows {
        planned.push((
            flow(
                Proto::Tcp,
                4,
                BULK_LOCAL_PORT + i,
                BULK_PORT,
                1000 + u64::from(i),
            ),
            bulk_class.clone(),
        ));
    }
    shaper.shape(classes, &planned);
    let mut probe = RrProbe::connect(pair);
    let idle = probe.measure(Duration::from_secs(2));
    let _server = Server::start(&pair.b, BULK_PORT);
    let mut run = Run::tcp(NetnsPair::b_addr(4), BULK_PORT, BULK_LOCAL_PORT);
    run.seconds = 14;
    run.omit = 2;
    run.reverse = download;
    run.parallel = flows;
    let bulk = run.start(&pair.a);
    std::thread::sleep(Duration::from_secs(3));
    let loaded = probe.measure(Duration::from_secs(10));
    let bulk = bulk.finish();
    let streams = bulk.json["end"]["streams"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s["receiver"]["bits_per_second"].as_f64())
                .collect()
        })
        .unwrap_or_default();
    LoadResult {
        idle,
        loaded,
        bulk,
        streams,
    }
}

/// The "between classes" case: a probe in a top-priority class (`prio = 0`) while one bulk flow
/// in another class saturates an 18 Mbit/s shaped link, on a namespace pair of its own.
pub fn top_priority_under_load(download: bool) -> LoadResult {
    let pair = NetnsPair::new();
    let mut shaper = Shaper::new(&pair.a);
    let link: shaper::units::Rate = "18mbit".parse().unwrap();
    shaper.capacity = shaper::shape::Capacity {
        up: Some(link),
        down: Some(link),
        framing: Default::default(),
    };
    let mut top = super::shaping::class("top", "", shaper::policy::Each::Class);
    top.prio = 0;
    let classes = super::shaping::class_set(vec![
        top,
        super::shaping::class("bulk", "", shaper::policy::Each::Class),
    ]);
    probe_under_load(
        &pair,
        &mut shaper,
        &classes,
        super::shaping::decision("top", ""),
        super::shaping::decision("bulk", ""),
        1,
        download,
    )
}
