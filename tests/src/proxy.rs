//! A userspace UDP proxy between a client and a broker, for cutting and degrading the network
//! in tests (`tc netem` is not available here). Each client address gets its own upstream
//! socket, so the broker sees the proxy as the client.
//!
//! Each direction (client -> broker "up", broker -> client "down") has its own [`LinkFaults`]:
//! cut, drop with a probability, delay (fixed + jitter), duplicate, and reorder (a datagram
//! held back so later ones overtake it). The random choices come from a seeded RNG per
//! direction ([`crate::faults::rng::Rng`]), so a seed replays the same decisions for the same
//! sequence of datagrams; the datagrams themselves and their timing are not deterministic
//! (real sockets, real clocks, real broker processes).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UdpSocket;

use crate::faults::rng::Rng;

/// What the proxy lets through (the whole-path shorthand the older tests use).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    Pass = 0,
    /// Requests reach the broker, answers are lost: the worst case for retries.
    DropToClient = 1,
    DropAll = 2,
}

/// How one direction of a proxy treats datagrams. `LinkFaults::default()` passes everything.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct LinkFaults {
    /// Drop everything.
    pub cut: bool,
    /// Probability of dropping a datagram.
    pub drop: f64,
    /// Every datagram waits this long...
    pub delay_ms: u64,
    /// ...plus a uniform 0..=jitter_ms more (so delayed datagrams reorder among themselves).
    pub jitter_ms: u64,
    /// Probability of sending a datagram twice.
    pub duplicate: f64,
    /// Probability of holding a datagram back 5-30 ms, so the next ones overtake it.
    pub reorder: f64,
}

impl LinkFaults {
    pub const PASS: LinkFaults =
        LinkFaults { cut: false, drop: 0.0, delay_ms: 0, jitter_ms: 0, duplicate: 0.0, reorder: 0.0 };
    pub const CUT: LinkFaults = LinkFaults { cut: true, ..LinkFaults::PASS };

    fn is_pass(&self) -> bool {
        *self == LinkFaults::PASS
    }
}

/// One direction's faults and its RNG. `shaped` is false while everything passes, so the
/// common case takes no lock.
#[derive(Debug)]
struct Direction {
    shaped: AtomicBool,
    state: Mutex<(LinkFaults, Rng)>,
}

/// What to do with one datagram.
enum Fate {
    Drop,
    /// Send after this delay; `twice`: send a second copy too.
    Send {
        after: Duration,
        twice: bool,
    },
}

impl Direction {
    fn new(seed: u64) -> Self {
        Direction { shaped: AtomicBool::new(false), state: Mutex::new((LinkFaults::PASS, Rng::new(seed))) }
    }

    fn set(&self, faults: LinkFaults) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.0 = faults;
        self.shaped.store(!faults.is_pass(), Ordering::Release);
    }

    fn get(&self) -> LinkFaults {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).0
    }

    fn fate(&self) -> Fate {
        if !self.shaped.load(Ordering::Acquire) {
            return Fate::Send { after: Duration::ZERO, twice: false };
        }
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (f, rng) = &mut *s;
        if f.cut || rng.chance(f.drop) {
            return Fate::Drop;
        }
        let mut after = f.delay_ms + if f.jitter_ms > 0 { rng.below(f.jitter_ms + 1) } else { 0 };
        if rng.chance(f.reorder) {
            after += 5 + rng.below(26);
        }
        Fate::Send { after: Duration::from_millis(after), twice: rng.chance(f.duplicate) }
    }
}

#[derive(Debug)]
pub struct UdpProxy {
    pub addr: SocketAddr,
    up: Arc<Direction>,
    down: Arc<Direction>,
    task: tokio::task::JoinHandle<()>,
}

impl UdpProxy {
    pub async fn start(upstream: SocketAddr) -> std::io::Result<UdpProxy> {
        Self::start_seeded(upstream, 0).await
    }

    /// As [`start`](UdpProxy::start), the two directions' RNGs seeded from `seed`.
    pub async fn start_seeded(upstream: SocketAddr, seed: u64) -> std::io::Result<UdpProxy> {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        let addr = front.local_addr()?;
        let up = Arc::new(Direction::new(Rng::derive(seed, 1)));
        let down = Arc::new(Direction::new(Rng::derive(seed, 2)));
        let task = tokio::spawn(run(front, upstream, up.clone(), down.clone()));
        Ok(UdpProxy { addr, up, down, task })
    }

    pub fn set(&self, mode: Mode) {
        let (up, down) = match mode {
            Mode::Pass => (LinkFaults::PASS, LinkFaults::PASS),
            Mode::DropToClient => (LinkFaults::PASS, LinkFaults::CUT),
            Mode::DropAll => (LinkFaults::CUT, LinkFaults::CUT),
        };
        self.up.set(up);
        self.down.set(down);
    }

    /// Faults of datagrams from the client towards the broker.
    pub fn set_up(&self, faults: LinkFaults) {
        self.up.set(faults);
    }

    /// Faults of datagrams from the broker back to the client.
    pub fn set_down(&self, faults: LinkFaults) {
        self.down.set(faults);
    }

    pub fn up(&self) -> LinkFaults {
        self.up.get()
    }

    pub fn down(&self) -> LinkFaults {
        self.down.get()
    }
}

impl Drop for UdpProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Sends `data` to `to` from `socket` as `fate` says (a delayed send on a task of its own).
fn forward(socket: &Arc<UdpSocket>, data: &[u8], to: SocketAddr, fate: Fate) {
    let Fate::Send { after, twice } = fate else { return };
    let copies = if twice { 2 } else { 1 };
    if after.is_zero() {
        for _ in 0..copies {
            let _ = socket.try_send_to(data, to);
        }
        return;
    }
    let (socket, data) = (socket.clone(), data.to_vec());
    tokio::spawn(async move {
        tokio::time::sleep(after).await;
        for _ in 0..copies {
            let _ = socket.send_to(&data, to).await;
        }
    });
}

async fn run(front: Arc<UdpSocket>, upstream: SocketAddr, up: Arc<Direction>, down: Arc<Direction>) {
    let mut backs: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    // The answer tasks end with this one (aborted when the proxy is dropped).
    let mut children = Children(Vec::new());
    let mut buf = vec![0u8; 65_536];
    loop {
        let Ok((n, client)) = front.recv_from(&mut buf).await else { break };
        let back = match backs.get(&client) {
            Some(b) => b.clone(),
            None => {
                let Ok(b) = UdpSocket::bind("127.0.0.1:0").await else { continue };
                let b = Arc::new(b);
                // Answers from the broker go back to this client, as `down` says.
                let (b2, front2, down2) = (b.clone(), front.clone(), down.clone());
                children.0.push(tokio::spawn(async move {
                    let mut buf = vec![0u8; 65_536];
                    while let Ok((n, _)) = b2.recv_from(&mut buf).await {
                        forward(&front2, &buf[..n], client, down2.fate());
                    }
                }));
                backs.insert(client, b.clone());
                b
            }
        };
        forward(&back, &buf[..n], upstream, up.fate());
    }
}

struct Children(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &self.0 {
            c.abort();
        }
    }
}
