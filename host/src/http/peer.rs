//! Noticing that a client went away while its request waits.
//!
//! actix-web does not drop a handler when an HTTP/1 client disconnects (actix/actix-web#3462),
//! so a plugin would go on working for nobody. Each inference connection keeps a duplicate of
//! its socket; while a request waits for its answer, the handler peeks at it. End of stream or
//! an error means the client is gone: the handler returns, which drops the reply channel, which
//! is what `ResponseSink::is_cancelled` reports to the plugin.

use std::any::Any;
use std::io::ErrorKind;
use std::os::fd::AsFd;

use actix_web::dev::Extensions;

/// A duplicate of a connection's socket, used only to peek.
pub struct PeerSocket(std::net::TcpStream);

/// `HttpServer::on_connect` hook: remember the socket of every TCP connection.
pub fn remember_socket(connection: &dyn Any, extensions: &mut Extensions) {
    if let Some(tcp) = connection.downcast_ref::<actix_web::rt::net::TcpStream>() {
        if let Ok(fd) = tcp.as_fd().try_clone_to_owned() {
            extensions.insert(PeerSocket(std::net::TcpStream::from(fd)));
        }
    }
}

impl PeerSocket {
    /// Whether the client closed or reset the connection. Pipelined bytes mean it is still
    /// there. A client that shuts down only its sending side after the request (allowed by
    /// HTTP/1.1, rare in practice) reads the same as a closed one and is taken as gone, as Go's
    /// net/http does. The socket is non-blocking (tokio set it so; the flag is shared with the
    /// duplicate), so this never waits.
    pub fn is_gone(&self) -> bool {
        let mut byte = [0u8; 1];
        match self.0.peek(&mut byte) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => false,
            Err(_) => true,
        }
    }
}
