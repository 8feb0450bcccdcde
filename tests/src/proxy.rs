//! A userspace UDP proxy between a client and a broker, for cutting the network in tests
//! (`tc netem` is not available here). Each client address gets its own upstream socket, so the
//! broker sees the proxy as the client.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use tokio::net::UdpSocket;

/// What the proxy lets through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    Pass = 0,
    /// Requests reach the broker, answers are lost: the worst case for retries.
    DropToClient = 1,
    DropAll = 2,
}

#[derive(Debug)]
pub struct UdpProxy {
    pub addr: SocketAddr,
    mode: Arc<AtomicU8>,
    task: tokio::task::JoinHandle<()>,
}

impl UdpProxy {
    pub async fn start(upstream: SocketAddr) -> std::io::Result<UdpProxy> {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        let addr = front.local_addr()?;
        let mode = Arc::new(AtomicU8::new(Mode::Pass as u8));
        let task = tokio::spawn(run(front, upstream, mode.clone()));
        Ok(UdpProxy { addr, mode, task })
    }

    pub fn set(&self, mode: Mode) {
        self.mode.store(mode as u8, Ordering::Release);
    }
}

impl Drop for UdpProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn run(front: Arc<UdpSocket>, upstream: SocketAddr, mode: Arc<AtomicU8>) {
    let mut backs: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut buf = vec![0u8; 65_536];
    loop {
        let Ok((n, client)) = front.recv_from(&mut buf).await else { return };
        if mode.load(Ordering::Acquire) == Mode::DropAll as u8 {
            continue;
        }
        let back = match backs.get(&client) {
            Some(b) => b.clone(),
            None => {
                let Ok(b) = UdpSocket::bind("127.0.0.1:0").await else { continue };
                let b = Arc::new(b);
                // Answers from the broker go back to this client, unless dropped.
                let (b2, front2, mode2) = (b.clone(), front.clone(), mode.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65_536];
                    while let Ok((n, _)) = b2.recv_from(&mut buf).await {
                        if mode2.load(Ordering::Acquire) == Mode::Pass as u8 {
                            let _ = front2.send_to(&buf[..n], client).await;
                        }
                    }
                });
                backs.insert(client, b.clone());
                b
            }
        };
        let _ = back.send_to(&buf[..n], upstream).await;
    }
}
