//! A worker pod's stdin, written through the `attach` subresource.
//!
//! The worker container runs with `stdin: true, stdinOnce: false`: its stdin
//! is a pipe that stays open across attach sessions, so the runner can
//! attach, write, go away (a restart) and attach again, and the CLI never
//! sees an end of input. Output is not read here: it keeps coming from
//! `pods/log`, which outlives any runner.
//!
//! An attach is a WebSocket speaking the `v5.channel.k8s.io` (or v4)
//! subprotocol: each binary frame starts with its channel, 0 for stdin; the
//! server sends a Status on channel 3 when the container ends. [`PodStdin`]
//! is an `AsyncWrite` over it: `flush` returns once everything written is on
//! the connection, writes fail with `BrokenPipe` once the connection is
//! over (attach again), and dropping it only closes the connection, which
//! leaves the container's stdin open.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::sync::PollSender;
use tracing::{Instrument, debug, info, info_span};

/// The stdin channel of the streaming subprotocols.
pub const STDIN_CHANNEL: u8 = 0;
/// Where the server reports how the attached container ended (v4, v5).
pub const STATUS_CHANNEL: u8 = 3;
/// The largest frame one write sends.
const MAX_CHUNK: usize = 64 * 1024;
/// A ping this often keeps an idle attach from being cut by a proxy.
const KEEPALIVE: Duration = Duration::from_secs(30);
/// How long closing the connection politely may take.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// One stdin frame: the channel, then the bytes.
pub fn stdin_frame(bytes: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(bytes.len() + 1);
    frame.push(STDIN_CHANNEL);
    frame.extend_from_slice(bytes);
    frame
}

/// A writer to a pod's stdin over one attach connection (see the module).
pub struct PodStdin {
    chunks: PollSender<Vec<u8>>,
    /// Bytes handed to the connection's task so far.
    queued: u64,
    /// Bytes the task has put on the connection so far.
    sent: watch::Receiver<u64>,
    /// A flush under way: up to which byte, and its wait.
    flushing: Option<(u64, BoxFuture<'static, bool>)>,
}

impl std::fmt::Debug for PodStdin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodStdin")
            .field("queued", &self.queued)
            .field("sent", &*self.sent.borrow())
            .finish_non_exhaustive()
    }
}

fn gone() -> io::Error {
    io::Error::new(
        io::ErrorKind::BrokenPipe,
        "the attach connection to the pod is over",
    )
}

impl PodStdin {
    /// Write to `pod`'s stdin over `ws`, an attach connection (a task owns it).
    pub fn over<S>(ws: S, pod: &str) -> Self
    where
        S: Stream<Item = Result<Message, tungstenite::Error>>
            + Sink<Message, Error = tungstenite::Error>
            + Send
            + Unpin
            + 'static,
    {
        let (tx, rx) = mpsc::channel(8);
        let (sent_tx, sent_rx) = watch::channel(0);
        tokio::spawn(pump(ws, rx, sent_tx).instrument(info_span!("pod_stdin", pod)));
        Self {
            chunks: PollSender::new(tx),
            queued: 0,
            sent: sent_rx,
            flushing: None,
        }
    }
}

/// Why an attach connection ended.
#[derive(Debug)]
enum End {
    /// The writer was dropped or shut down.
    Dropped,
    /// The container ended (the server's Status).
    Status(String),
    Closed,
    Broken(tungstenite::Error),
}

/// Move the written chunks onto the connection, count them, answer and send
/// pings, until the writer goes or the connection ends.
async fn pump<S>(mut ws: S, mut chunks: mpsc::Receiver<Vec<u8>>, sent: watch::Sender<u64>)
where
    S: Stream<Item = Result<Message, tungstenite::Error>>
        + Sink<Message, Error = tungstenite::Error>
        + Unpin,
{
    let mut total = 0u64;
    let mut keepalive = tokio::time::interval(KEEPALIVE);
    keepalive.reset();
    let end = loop {
        tokio::select! {
            chunk = chunks.recv() => match chunk {
                Some(bytes) => {
                    if let Err(e) = ws.send(Message::binary(stdin_frame(&bytes))).await {
                        break End::Broken(e);
                    }
                    total += bytes.len() as u64;
                    sent.send_replace(total);
                }
                None => break End::Dropped,
            },
            msg = ws.next() => match msg {
                Some(Ok(Message::Binary(b))) if b.first() == Some(&STATUS_CHANNEL) => {
                    break End::Status(String::from_utf8_lossy(&b[1..]).into_owned());
                }
                // Pings are answered by the WebSocket itself; stdout and
                // stderr were not asked for.
                Some(Ok(Message::Close(_))) | None => break End::Closed,
                Some(Ok(_)) => {}
                Some(Err(e)) => break End::Broken(e),
            },
            _ = keepalive.tick() => {
                if let Err(e) = ws.send(Message::Ping(Default::default())).await {
                    break End::Broken(e);
                }
            }
        }
    };
    // Writes and flushes fail from here on.
    chunks.close();
    drop(sent);
    match end {
        End::Dropped => {
            debug!(bytes = total, "stdin writer dropped; closing the attach");
            let _ = tokio::time::timeout(CLOSE_WAIT, ws.close()).await;
        }
        End::Status(status) => info!(%status, bytes = total, "the attached container ended"),
        End::Closed => info!(bytes = total, "the attach connection was closed"),
        End::Broken(e) => info!(error = %e, bytes = total, "the attach connection broke"),
    }
}

impl tokio::io::AsyncWrite for PodStdin {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let this = &mut *self;
        if ready!(this.chunks.poll_reserve(cx)).is_err() {
            return Poll::Ready(Err(gone()));
        }
        let n = buf.len().min(MAX_CHUNK);
        this.chunks
            .send_item(buf[..n].to_vec())
            .map_err(|_| gone())?;
        this.queued += n as u64;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let target = this.queued;
        if *this.sent.borrow() >= target {
            this.flushing = None;
            return Poll::Ready(Ok(()));
        }
        if this.flushing.as_ref().map(|(t, _)| *t) != Some(target) {
            let mut sent = this.sent.clone();
            let wait = async move { sent.wait_for(|s| *s >= target).await.is_ok() };
            this.flushing = Some((target, Box::pin(wait)));
        }
        let Some((_, wait)) = this.flushing.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        let done = ready!(wait.as_mut().poll(cx));
        this.flushing = None;
        Poll::Ready(if done { Ok(()) } else { Err(gone()) })
    }

    /// Flush, then close the connection (not the container's stdin).
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.as_mut().poll_flush(cx))?;
        self.chunks.close();
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio_tungstenite::WebSocketStream;
    use tokio_tungstenite::tungstenite::protocol::Role;

    /// A writer over an in-memory connection, and the server's end of it.
    async fn pair() -> (PodStdin, WebSocketStream<tokio::io::DuplexStream>) {
        let (a, b) = tokio::io::duplex(1 << 16);
        let client = WebSocketStream::from_raw_socket(a, Role::Client, None).await;
        let server = WebSocketStream::from_raw_socket(b, Role::Server, None).await;
        (PodStdin::over(client, "p"), server)
    }

    async fn next_binary(server: &mut WebSocketStream<tokio::io::DuplexStream>) -> Vec<u8> {
        loop {
            match server.next().await.expect("a frame").expect("no error") {
                Message::Binary(b) => return b.to_vec(),
                Message::Ping(_) | Message::Pong(_) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn writes_go_out_as_stdin_frames_by_the_flush() {
        let (mut stdin, mut server) = pair().await;
        stdin.write_all(b"{\"type\":\"user\"}\n").await.unwrap();
        stdin.flush().await.unwrap();
        assert_eq!(*stdin.sent.borrow(), 16, "flushed means sent");
        assert_eq!(next_binary(&mut server).await, b"\0{\"type\":\"user\"}\n");
        stdin.write_all(b"more").await.unwrap();
        stdin.flush().await.unwrap();
        assert_eq!(next_binary(&mut server).await, b"\0more");
    }

    #[tokio::test]
    async fn dropping_the_writer_closes_the_connection_without_an_end_of_stdin() {
        let (mut stdin, mut server) = pair().await;
        stdin.write_all(b"x").await.unwrap();
        stdin.flush().await.unwrap();
        drop(stdin);
        assert_eq!(next_binary(&mut server).await, b"\0x");
        // Nothing else: no v5 close-stdin signal (255, 0), just the close.
        match server.next().await {
            Some(Ok(Message::Close(_))) | None => {}
            other => panic!("expected the connection to close, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn writes_fail_once_the_container_ended() {
        let (mut stdin, mut server) = pair().await;
        let status = b"\x03{\"metadata\":{},\"status\":\"Success\"}".to_vec();
        server.send(Message::binary(status)).await.unwrap();
        // The task sees the status and stops taking writes.
        let mut failed = None;
        for _ in 0..100 {
            match stdin.write_all(b"late").await.and(stdin.flush().await) {
                Ok(()) => tokio::time::sleep(Duration::from_millis(10)).await,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        assert_eq!(
            failed.expect("a write fails").kind(),
            io::ErrorKind::BrokenPipe
        );
    }

    #[test]
    fn a_stdin_frame_leads_with_channel_zero() {
        assert_eq!(stdin_frame(b"hi"), vec![0, b'h', b'i']);
        assert_eq!(stdin_frame(b""), vec![0]);
    }
}
