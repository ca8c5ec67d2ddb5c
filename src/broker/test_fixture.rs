//! The fixture the broker's unit tests share: a broker over the recording double, in a
//! state directory of its own, with `Hello` said.
#![cfg(test)]

use std::os::unix::fs::PermissionsExt;

use super::handlers::launch;
use super::os_double::{broker_for_tests, RecordingOs};
use super::{table, Broker, LinkState, PeerKind};
use crate::wire::{
    BrokerMessage, ErrorKind, Handle, Program, Purpose, ReplyBody, Request, RequestBody,
    SpawnRequest, PROTOCOL_VERSION,
};

pub struct Fixture {
    pub broker: Broker,
    pub os: RecordingOs,
    pub admin: String,
    pub dir: std::path::PathBuf,
    next_id: u64,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A broker that knows alice (2001), bob (2002), root and the service user (999); `name`
/// must be unique among the tests (it names the state directory).
pub fn fixture(name: &str) -> Fixture {
    let dir = std::env::temp_dir().join(format!("stoa-broker-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let os = RecordingOs::new(&[("alice", 2001), ("bob", 2002), ("root", 0), ("stoa", 999)]);
    let (broker, admin) = broker_for_tests(os.clone(), &dir).unwrap();
    let mut f = Fixture {
        broker,
        os,
        admin,
        dir,
        next_id: 0,
    };
    f.send(RequestBody::Hello {
        protocol: PROTOCOL_VERSION,
    })
    .unwrap();
    f.replies();
    f
}

impl Fixture {
    /// From now on, requests come on `user`'s worker link (made and greeted on first use);
    /// `None`: on the front's.
    pub fn on_worker(&mut self, user: Option<(&str, u32)>) {
        let kind = match user {
            Some((name, uid)) => PeerKind::Worker {
                uid,
                name: name.into(),
            },
            None => PeerKind::Front,
        };
        let found = self
            .broker
            .peers
            .iter()
            .find(|(_, p)| p.kind == kind)
            .map(|(l, _)| *l);
        match found {
            Some(l) => {
                self.broker.link = l;
                self.broker.link_state = self.broker.peers[&l].state;
            }
            None => {
                self.broker.link = self.broker.add_link(kind);
                self.broker.link_state = LinkState::Fresh;
                self.send(RequestBody::Hello {
                    protocol: PROTOCOL_VERSION,
                })
                .unwrap();
                self.replies();
            }
        }
    }

    /// The current worker's link is gone and a new one took its place (a worker restart).
    pub fn replace_worker(&mut self) {
        let old = self.broker.link;
        let kind = self.broker.peers[&old].kind.clone();
        self.broker.drop_link(old);
        self.broker.link = self.broker.add_link(kind);
        self.broker.link_state = LinkState::Fresh;
        self.send(RequestBody::Hello {
            protocol: PROTOCOL_VERSION,
        })
        .unwrap();
        self.replies();
    }

    pub fn send(&mut self, body: RequestBody) -> Result<(), String> {
        self.next_id += 1;
        let link = self.broker.link;
        if let Some(p) = self.broker.peers.get(&link) {
            self.broker.link_state = p.state;
        }
        let result = table::dispatch(
            &mut self.broker,
            Request {
                id: self.next_id,
                request_id: None,
                body,
            },
        );
        let state = self.broker.link_state;
        if let Some(p) = self.broker.peers.get_mut(&link) {
            p.state = state;
        }
        result
    }

    /// What went out, in order (replies and events).
    pub fn replies(&mut self) -> Vec<BrokerMessage> {
        std::mem::take(&mut self.broker.outbox)
            .into_iter()
            .map(|o| o.message)
            .collect()
    }

    pub fn spawn_req(&self, credential: &str, user: &str, argv: Vec<String>) -> RequestBody {
        RequestBody::Spawn(SpawnRequest {
            credential: credential.into(),
            unix_user: user.into(),
            program: Program::Exec { argv },
            cwd: None,
            cwd_id: None,
            env: vec![],
            tty: None,
            stdin: false,
            keep_stdin: false,
            secrets: false,
            secret_names: None,
            ring_bytes: 0,
            purpose: Purpose::Agent,
        })
    }

    /// Spawns `argv` as `user` with the admin token, lets it exec; returns the handle.
    pub fn spawn_as(&mut self, user: &str, argv: &[&str]) -> Handle {
        let uid = match user {
            "alice" => 2001,
            "bob" => 2002,
            "root" => 0,
            _ => 999,
        };
        self.on_worker(Some((user, uid)));
        let argv = argv.iter().map(|a| a.to_string()).collect();
        let body = self.spawn_req(&self.admin.clone(), user, argv);
        self.send(body).unwrap();
        launch::check_starting(&mut self.broker);
        match self.replies().pop() {
            Some(BrokerMessage::Reply {
                body: ReplyBody::Spawned(info),
                ..
            }) => info.handle,
            other => panic!("expected Spawned, got {other:?}"),
        }
    }

    pub fn audit_bytes(&self) -> u64 {
        std::fs::metadata(self.dir.join("audit.jsonl"))
            .unwrap()
            .len()
    }
}

/// The error kind of a reply, if it is an error.
pub fn error_kind(m: &BrokerMessage) -> Option<ErrorKind> {
    match m {
        BrokerMessage::Reply {
            body: ReplyBody::Error(e),
            ..
        } => Some(e.kind.clone()),
        _ => None,
    }
}
