//! Abuse of `Login`/`Logout`: wrong passwords, guessing, root and the service user, users
//! the policy refuses, a helper that never answers, and what a log-in's credential may do.
//! The real dispatcher and handlers over the recording double (its "PAM" accepts the
//! passwords a test gives it).
#![cfg(test)]

use std::path::PathBuf;
use std::time::Instant;

use super::handlers::login::{self, FAILURES_PER_USER};
use super::os_double::{Call, ChildScript};
use super::spawn::Account;
use super::test_fixture::{self, Fixture};
use crate::wire::{
    BrokerMessage, ErrorKind, Event, Principal, ReplyBody, RequestBody, LOGIN_KEY_BIT,
};

fn fixture(name: &str) -> Fixture {
    let mut f = test_fixture::fixture(&format!("login-{name}"));
    f.os.0
        .borrow_mut()
        .passwords
        .insert("alice".into(), "alice's secret".into());
    // A user below the policy's uid range.
    f.os.0.borrow_mut().users.insert(
        "daemonish".into(),
        Account {
            name: "daemonish".into(),
            uid: 500,
            gid: 500,
            home: PathBuf::from("/"),
            shell: PathBuf::from("/bin/sh"),
            groups: vec![500],
        },
    );
    f.os.0
        .borrow_mut()
        .passwords
        .insert("daemonish".into(), "pw".into());
    f.on_worker(None);
    f
}

fn attempt(f: &mut Fixture, user: &str, password: &str) -> Result<ReplyBody, ErrorKind> {
    f.send(RequestBody::Login {
        username: user.into(),
        password: password.into(),
        peer: Some("192.0.2.7".into()),
    })
    .expect("not a violation");
    // The helper's answer is read by the loop's poll; here, at once.
    login::check_logins(&mut f.broker);
    match f.replies().as_slice() {
        [BrokerMessage::Reply {
            body: ReplyBody::Error(e),
            ..
        }] => Err(e.kind.clone()),
        [BrokerMessage::Reply { body, .. }] => Ok(body.clone()),
        other => panic!("expected one reply, got {other:?}"),
    }
}

fn checks_started(f: &Fixture) -> usize {
    f.os.calls()
        .iter()
        .filter(|c| matches!(c, Call::StartLoginCheck { .. }))
        .count()
}

fn authenticate(f: &mut Fixture, credential: &str) -> Result<Principal, ErrorKind> {
    f.send(RequestBody::Authenticate {
        credential: credential.into(),
        peer: None,
    })
    .unwrap();
    match f.replies().as_slice() {
        [BrokerMessage::Reply {
            body: ReplyBody::Principal(p),
            ..
        }] => Ok(p.clone()),
        [BrokerMessage::Reply {
            body: ReplyBody::Error(e),
            ..
        }] => Err(e.kind.clone()),
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_right_password_gives_a_credential_for_that_unix_user_only() {
    let mut f = fixture("ok");
    let ReplyBody::LoggedIn {
        credential,
        unix_user,
        expires_at,
    } = attempt(&mut f, "alice", "alice's secret").unwrap()
    else {
        panic!("not logged in")
    };
    assert_eq!(unix_user, "alice");
    assert!(expires_at > super::credentials::now_secs());
    let p = authenticate(&mut f, &credential).unwrap();
    assert!(matches!(&p, Principal::Login { uid: 2001, unix_user, .. } if unix_user == "alice"));
    assert!(!p.is_admin());
    assert_eq!(p.owner(), "unix:2001");
    // It reaches alice's worker, not bob's.
    f.send(RequestBody::OpenWorker {
        credential: credential.clone(),
        unix_user: "bob".into(),
        start: true,
    })
    .unwrap();
    assert!(matches!(
        test_fixture::error_kind(&f.replies()[0]),
        Some(ErrorKind::Forbidden)
    ));
    // Nor is it an admin's.
    f.send(RequestBody::ListAll {
        credential: credential.clone(),
        after: None,
    })
    .unwrap();
    assert!(test_fixture::error_kind(&f.replies()[0]).is_some());
}

#[test]
fn a_wrong_password_and_an_unknown_user_get_the_same_answer_and_guessing_is_cut_off() {
    let mut f = fixture("wrong");
    assert_eq!(
        attempt(&mut f, "alice", "guess").unwrap_err(),
        ErrorKind::Unauthorized
    );
    assert_eq!(
        attempt(&mut f, "nobody-here", "guess").unwrap_err(),
        ErrorKind::Unauthorized
    );
    for _ in 1..FAILURES_PER_USER {
        assert_eq!(
            attempt(&mut f, "alice", "guess").unwrap_err(),
            ErrorKind::Unauthorized
        );
    }
    let started = checks_started(&f);
    // Over the limit even the right password is not checked now.
    assert_eq!(
        attempt(&mut f, "alice", "alice's secret").unwrap_err(),
        ErrorKind::Refused {
            rule: "login-throttle".into()
        }
    );
    assert_eq!(checks_started(&f), started, "no helper started");
    // Another user is not held up by the guesses at alice (the address is under its limit).
    f.os.0
        .borrow_mut()
        .passwords
        .insert("bob".into(), "bob's".into());
    assert!(attempt(&mut f, "bob", "bob's").is_ok());
}

#[test]
fn root_and_the_service_user_are_refused_without_a_password_check() {
    let mut f = fixture("root");
    // root by name, in the broker: no helper at all.
    assert_eq!(
        attempt(&mut f, "root", "whatever").unwrap_err(),
        ErrorKind::Refused {
            rule: "root".into()
        }
    );
    assert_eq!(checks_started(&f), 0);
    // The service user (and any other name of uid 0) by the helper's lookup, before PAM:
    // the broker looks no name up for an unauthenticated request.
    assert_eq!(
        attempt(&mut f, "stoa", "whatever").unwrap_err(),
        ErrorKind::Refused {
            rule: "service-user".into()
        }
    );
    assert!(!f
        .os
        .calls()
        .iter()
        .any(|c| matches!(c, Call::LookupUser(u) if u == "stoa")));
}

#[test]
fn a_guesser_elsewhere_cannot_lock_a_user_out_from_her_own_address() {
    let mut f = fixture("lockout");
    let from = |f: &mut Fixture, peer: &str, password: &str| {
        f.send(RequestBody::Login {
            username: "alice".into(),
            password: password.into(),
            peer: Some(peer.into()),
        })
        .unwrap();
        login::check_logins(&mut f.broker);
        match f.replies().as_slice() {
            [BrokerMessage::Reply {
                body: ReplyBody::Error(e),
                ..
            }] => Err(e.kind.clone()),
            [BrokerMessage::Reply { body, .. }] => Ok(body.clone()),
            other => panic!("{other:?}"),
        }
    };
    for _ in 0..FAILURES_PER_USER {
        assert!(from(&mut f, "2001:db8::1", "guess").is_err());
    }
    // The guesser's whole /64 is held back, alice at home is not.
    assert_eq!(
        from(&mut f, "2001:db8::2", "alice's secret").unwrap_err(),
        ErrorKind::Refused {
            rule: "login-throttle".into()
        }
    );
    assert!(from(&mut f, "192.0.2.50", "alice's secret").is_ok());
}

#[test]
fn a_user_the_policy_refuses_is_told_the_rule_only_with_the_right_password() {
    let mut f = fixture("policy");
    assert_eq!(
        attempt(&mut f, "daemonish", "wrong").unwrap_err(),
        ErrorKind::Unauthorized
    );
    match attempt(&mut f, "daemonish", "pw").unwrap_err() {
        ErrorKind::Refused { rule } => assert!(!rule.is_empty()),
        other => panic!("{other:?}"),
    }
}

#[test]
fn malformed_attempts_are_refused_before_any_check() {
    let mut f = fixture("malformed");
    for (user, password) in [
        ("alice", ""),
        ("alice", "a\0b"),
        ("../etc", "x"),
        ("alice", &"x".repeat(2000)),
    ] {
        assert_eq!(
            attempt(&mut f, user, password).unwrap_err(),
            ErrorKind::BadRequest
        );
    }
    assert_eq!(checks_started(&f), 0);
}

#[test]
fn a_helper_that_never_answers_is_killed_at_its_deadline_and_holds_up_no_one_else() {
    let mut f = fixture("hang");
    f.os.0.borrow_mut().children = ChildScript::Hangs;
    f.send(RequestBody::Login {
        username: "alice".into(),
        password: "alice's secret".into(),
        peer: None,
    })
    .unwrap();
    login::check_logins(&mut f.broker);
    assert!(
        f.replies().is_empty(),
        "no answer yet: the broker did not wait"
    );
    // A second attempt for alice while hers is checked: refused, not queued.
    assert_eq!(
        attempt(&mut f, "alice", "x").unwrap_err(),
        ErrorKind::Refused {
            rule: "login-busy".into()
        }
    );
    f.broker.login_checks[0].deadline = Instant::now();
    login::check_logins(&mut f.broker);
    assert!(matches!(
        test_fixture::error_kind(&f.replies()[0]),
        Some(ErrorKind::Failed)
    ));
    assert!(f.os.calls().contains(&Call::KillPidfd));
    assert!(f.broker.login_checks.is_empty());
}

#[test]
fn logout_ends_the_credential_and_tells_every_link() {
    let mut f = fixture("logout");
    let Ok(ReplyBody::LoggedIn { credential, .. }) = attempt(&mut f, "alice", "alice's secret")
    else {
        panic!()
    };
    let Ok(Principal::Login { session, .. }) = authenticate(&mut f, &credential) else {
        panic!()
    };
    f.send(RequestBody::Logout {
        credential: credential.clone(),
    })
    .unwrap();
    let out = f.replies();
    assert!(out.iter().any(|m| matches!(
        m,
        BrokerMessage::Event(Event::Revoked { keys }) if keys == &vec![LOGIN_KEY_BIT | session]
    )));
    assert_eq!(
        authenticate(&mut f, &credential).unwrap_err(),
        ErrorKind::Unauthorized
    );
}

#[test]
fn a_worker_may_not_log_anyone_in() {
    let mut f = fixture("worker");
    f.on_worker(Some(("alice", 2001)));
    assert!(f
        .send(RequestBody::Login {
            username: "alice".into(),
            password: "alice's secret".into(),
            peer: None,
        })
        .is_err());
}
