//! The shells' local sockets: a TCP or Unix-socket connection the laptop daemon or the agent
//! opened or accepted, pumped onto a stream, and reset when the other side reset.

use std::sync::Arc;

use tokio::net::{TcpStream, UnixStream};

use crate::pump::{pump, Counters, End};
use crate::turns::Turns;

/// A local connection.
#[derive(Debug)]
pub enum Sock {
    Tcp(TcpStream),
    Unix(UnixStream),
    /// An in-memory connection: the simulation's servers and clients.
    Pipe(tokio::io::DuplexStream),
}

impl Sock {
    /// Closes the connection with a TCP reset (RST) instead of a FIN: what the other side's
    /// reset becomes here. A Unix socket or a pipe has no reset; it is closed.
    pub fn reset(self) {
        if let Sock::Tcp(s) = &self {
            // SO_LINGER 0 makes the close send RST at once; it never blocks the thread (the
            // deprecation is about non-zero lingers).
            #[allow(deprecated)]
            let _ = s.set_linger(Some(std::time::Duration::ZERO));
        }
        drop(self);
    }

    /// Pumps this connection onto `(send, recv)` (a stream of the connection whose bulk
    /// streams `turns` queues) until it ends, resetting it when the other side reset.
    pub async fn pump(
        mut self,
        send: &mut quinn::SendStream,
        recv: &mut quinn::RecvStream,
        counters: &Counters,
        turns: &Arc<Turns>,
    ) -> End {
        let end = match &mut self {
            Sock::Tcp(s) => {
                let _ = s.set_nodelay(true);
                let (mut r, mut w) = s.split();
                pump(&mut r, &mut w, send, recv, counters, turns).await
            }
            Sock::Unix(s) => {
                let (mut r, mut w) = s.split();
                pump(&mut r, &mut w, send, recv, counters, turns).await
            }
            Sock::Pipe(s) => {
                let (mut r, mut w) = tokio::io::split(s);
                pump(&mut r, &mut w, send, recv, counters, turns).await
            }
        };
        if matches!(end, End::RemoteReset(_)) {
            self.reset();
        }
        end
    }
}
