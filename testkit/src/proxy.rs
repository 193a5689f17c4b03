//! A TCP proxy on a free loopback port in front of one server, for faults a real server cannot produce:
//! [`TcpProxy::lose_replies`] keeps forwarding what clients send but drops everything the server answers
//! (the request lands, its reply never arrives, as when a connection is cut after a write committed), and
//! [`TcpProxy::restore`] cuts the connections that lost bytes (their byte streams are no longer whole)
//! and forwards again. Plain threads: it works whatever runtime, if any, the test uses.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// What the proxy's threads share.
#[derive(Default)]
struct State {
    /// Whether replies (server to client bytes) are dropped.
    losing: AtomicBool,
    stopped: AtomicBool,
    /// Every open connection: both sockets, and whether a reply was dropped on it.
    conns: Mutex<Vec<Conn>>,
}

struct Conn {
    client: TcpStream,
    server: TcpStream,
    lost: Arc<AtomicBool>,
}

/// A proxy to `upstream`, stopped (every connection cut) when dropped.
pub struct TcpProxy {
    addr: SocketAddr,
    state: Arc<State>,
}

impl TcpProxy {
    /// Listens on a free loopback port and forwards each connection to `upstream`.
    pub fn start(upstream: SocketAddr) -> TcpProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State::default());
        let shared = state.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if shared.stopped.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue; // the client sees its connection closed, as with a server down
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let lost = Arc::new(AtomicBool::new(false));
                let (Ok(c1), Ok(c2), Ok(s1), Ok(s2)) = (
                    client.try_clone(),
                    client.try_clone(),
                    server.try_clone(),
                    server.try_clone(),
                ) else {
                    continue;
                };
                shared.conns.lock().unwrap().push(Conn {
                    client,
                    server,
                    lost: lost.clone(),
                });
                // Requests always go through.
                std::thread::spawn(move || pump(c1, s1, None));
                // Replies go through unless they are being lost.
                let state = shared.clone();
                std::thread::spawn(move || pump(s2, c2, Some((state, lost))));
            }
        });
        TcpProxy { addr, state }
    }

    /// The proxy's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`, as an etcd endpoint.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// From now on, what the server sends is dropped; what clients send still reaches it.
    pub fn lose_replies(&self) {
        self.state.losing.store(true, Ordering::SeqCst);
    }

    /// Forwards replies again, first cutting every connection that lost some (the client then connects
    /// anew, through the proxy).
    pub fn restore(&self) {
        self.state.losing.store(false, Ordering::SeqCst);
        let mut conns = self.state.conns.lock().unwrap();
        conns.retain(|c| {
            if c.lost.load(Ordering::SeqCst) {
                let _ = c.client.shutdown(Shutdown::Both);
                let _ = c.server.shutdown(Shutdown::Both);
                false
            } else {
                true
            }
        });
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.state.stopped.store(true, Ordering::SeqCst);
        // Wakes the accept loop so that it sees `stopped`.
        let _ = TcpStream::connect(self.addr);
        for c in self.state.conns.lock().unwrap().drain(..) {
            let _ = c.client.shutdown(Shutdown::Both);
            let _ = c.server.shutdown(Shutdown::Both);
        }
    }
}

/// Copies `from` to `to` until either ends; with `losing`, drops what is read while the proxy loses
/// replies (and marks the connection as having lost bytes).
fn pump(mut from: TcpStream, mut to: TcpStream, losing: Option<(Arc<State>, Arc<AtomicBool>)>) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some((state, lost)) = &losing
            && state.losing.load(Ordering::SeqCst)
        {
            lost.store(true, Ordering::SeqCst);
            continue;
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}
