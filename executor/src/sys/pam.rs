//! Checking a Unix account's password with PAM, for the log-in helper (`stoa __pam-login`,
//! a short-lived root process per attempt: PAM modules never load in the broker or the
//! front).
//!
//! `libpam.so.0` is opened at run time (`dlopen`), so building stoa needs no `-dev` package:
//! a fresh Debian has the library but not its headers or its `libpam.so` link. The
//! declarations below follow Linux-PAM's `<security/_pam_types.h>`.
//!
//! | step                | call                                   | refusal it can give                    |
//! |---------------------|----------------------------------------|----------------------------------------|
//! | start               | `pam_start(service, user, conv)`       | PAM not usable (`Unavailable`)         |
//! | where from          | `pam_set_item(PAM_RHOST)`              | –                                      |
//! | the password        | `pam_authenticate(PAM_DISALLOW_NULL_AUTHTOK)` | wrong password or unknown user (one answer for both) |
//! | the account         | `pam_acct_mgmt(PAM_DISALLOW_NULL_AUTHTOK)` | expired, locked by policy, password must change |
//! | end                 | `pam_end`                              | –                                      |
//!
//! The conversation answers the first prompt that hides what is typed with the password, a
//! visible prompt for the login name with the name, and any other prompt with a
//! conversation error: the password is never given to a prompt it was not meant for (a
//! second factor this helper cannot ask for fails closed).

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::ptr;

const PAM_SUCCESS: c_int = 0;
const PAM_PERM_DENIED: c_int = 6;
const PAM_AUTH_ERR: c_int = 7;
const PAM_CRED_INSUFFICIENT: c_int = 8;
const PAM_USER_UNKNOWN: c_int = 10;
const PAM_MAXTRIES: c_int = 11;
const PAM_NEW_AUTHTOK_REQD: c_int = 12;
const PAM_CONV_ERR: c_int = 19;
const PAM_BUF_ERR: c_int = 5;

const PAM_PROMPT_ECHO_OFF: c_int = 1;
const PAM_PROMPT_ECHO_ON: c_int = 2;
const PAM_ERROR_MSG: c_int = 3;
const PAM_TEXT_INFO: c_int = 4;

const PAM_RHOST: c_int = 4;
const PAM_DISALLOW_NULL_AUTHTOK: c_int = 0x0001;
/// Most messages kept from the modules (each clipped), for the refusal's words.
const MAX_MESSAGES: usize = 8;

#[repr(C)]
struct PamMessage {
    msg_style: c_int,
    msg: *const c_char,
}

#[repr(C)]
struct PamResponse {
    resp: *mut c_char,
    resp_retcode: c_int,
}

type ConvFn = unsafe extern "C" fn(
    num_msg: c_int,
    msg: *mut *const PamMessage,
    resp: *mut *mut PamResponse,
    appdata: *mut c_void,
) -> c_int;

#[repr(C)]
struct PamConv {
    conv: ConvFn,
    appdata: *mut c_void,
}

type PamStart = unsafe extern "C" fn(
    service: *const c_char,
    user: *const c_char,
    conv: *const PamConv,
    handle: *mut *mut c_void,
) -> c_int;
type PamStep = unsafe extern "C" fn(handle: *mut c_void, flags: c_int) -> c_int;
type PamSetItem =
    unsafe extern "C" fn(handle: *mut c_void, item: c_int, value: *const c_void) -> c_int;
type PamStrerror = unsafe extern "C" fn(handle: *mut c_void, errnum: c_int) -> *const c_char;

/// Why a log-in was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// Wrong password, unknown user, a locked password: one answer, so nobody learns which.
    Credentials,
    /// The account may not log in now (expired, refused by the account policy).
    Account(String),
    /// The password is right but must be changed first.
    PasswordExpired,
    /// PAM could not be used at all (no library, a broken configuration).
    Unavailable(String),
}

/// What the conversation knows; lives on the caller's stack for the whole PAM run.
struct Conversation {
    password: CString,
    username: CString,
    password_given: bool,
    messages: Vec<String>,
}

/// The conversation function PAM calls. Never unwinds (it is called from C).
unsafe extern "C" fn converse(
    num_msg: c_int,
    msg: *mut *const PamMessage,
    resp: *mut *mut PamResponse,
    appdata: *mut c_void,
) -> c_int {
    if num_msg <= 0 || num_msg > 32 || msg.is_null() || resp.is_null() || appdata.is_null() {
        return PAM_CONV_ERR;
    }
    let count = num_msg as usize;
    // SAFETY: `appdata` is the `Conversation` `authenticate` passed to `pam_start`, alive
    // and not otherwise borrowed while PAM runs (PAM calls this only from inside the calls
    // `authenticate` makes).
    let conv = unsafe { &mut *(appdata as *mut Conversation) };
    // SAFETY: calloc of `count` zeroed responses; PAM frees the array and each `resp`
    // with free(3), so both come from the C allocator.
    let replies =
        unsafe { libc::calloc(count, std::mem::size_of::<PamResponse>()) } as *mut PamResponse;
    if replies.is_null() {
        return PAM_BUF_ERR;
    }
    let mut failed = false;
    for i in 0..count {
        // SAFETY: Linux-PAM passes an array of `num_msg` pointers to messages, each valid
        // for the length of this call.
        let m = unsafe { *msg.add(i) };
        if m.is_null() {
            failed = true;
            break;
        }
        // SAFETY: as above; `msg` is a NUL-terminated string or null.
        let (style, text) = unsafe {
            let m = &*m;
            let text = if m.msg.is_null() {
                String::new()
            } else {
                CStr::from_ptr(m.msg)
                    .to_string_lossy()
                    .chars()
                    .take(200)
                    .collect()
            };
            (m.msg_style, text)
        };
        let answer: Option<&CStr> = match style {
            PAM_PROMPT_ECHO_OFF if !conv.password_given => {
                conv.password_given = true;
                Some(&conv.password)
            }
            // A visible prompt that asks for the login name gets it; any other (a code a
            // second factor wants) fails the conversation.
            PAM_PROMPT_ECHO_ON
                if {
                    let t = text.to_ascii_lowercase();
                    t.contains("login") || t.contains("user")
                } =>
            {
                Some(&conv.username)
            }
            PAM_ERROR_MSG | PAM_TEXT_INFO => {
                if conv.messages.len() < MAX_MESSAGES && !text.is_empty() {
                    conv.messages.push(text);
                }
                None
            }
            _ => {
                failed = true;
                break;
            }
        };
        if let Some(answer) = answer {
            // SAFETY: strdup copies a NUL-terminated string into memory PAM frees.
            let copy = unsafe { libc::strdup(answer.as_ptr()) };
            if copy.is_null() {
                failed = true;
                break;
            }
            // SAFETY: `i < count`, inside the calloc'd array.
            unsafe { (*replies.add(i)).resp = copy };
        }
    }
    if failed {
        for i in 0..count {
            // SAFETY: each `resp` is null or a strdup'd string of ours; wiped, then freed.
            unsafe {
                let r = (*replies.add(i)).resp;
                if !r.is_null() {
                    libc::explicit_bzero(r as *mut c_void, libc::strlen(r));
                    libc::free(r as *mut c_void);
                }
            }
        }
        // SAFETY: the array calloc'd above, not given to PAM.
        unsafe { libc::free(replies as *mut c_void) };
        return PAM_CONV_ERR;
    }
    // SAFETY: `resp` is PAM's out-pointer; it takes ownership of the array.
    unsafe { *resp = replies };
    PAM_SUCCESS
}

/// Checks `username`'s `password` with the PAM service `service` (its account checks too).
/// `rhost`: where the attempt came from, for PAM's logs and modules.
pub fn authenticate(
    service: &str,
    username: &str,
    password: &[u8],
    rhost: Option<&str>,
) -> Result<(), Refused> {
    let unavailable = |what: String| Refused::Unavailable(what);
    let service = CString::new(service).map_err(|_| unavailable("NUL in the service".into()))?;
    let user = CString::new(username).map_err(|_| Refused::Credentials)?;
    let password = CString::new(password).map_err(|_| Refused::Credentials)?;
    let rhost = rhost.and_then(|r| CString::new(r).ok());

    // SAFETY: loading Linux-PAM runs its initialisers, which are plain C library set-up.
    let library = unsafe { libloading::Library::new("libpam.so.0") }
        .map_err(|e| unavailable(format!("cannot load libpam.so.0: {e}")))?;
    // SAFETY: the signatures are Linux-PAM's (see the module comment); the symbols are used
    // only while `library` is loaded (it lives to the end of this function).
    let (start, auth, acct, end, set_item, strerror) = unsafe {
        (
            *library
                .get::<PamStart>(b"pam_start\0")
                .map_err(|e| unavailable(e.to_string()))?,
            *library
                .get::<PamStep>(b"pam_authenticate\0")
                .map_err(|e| unavailable(e.to_string()))?,
            *library
                .get::<PamStep>(b"pam_acct_mgmt\0")
                .map_err(|e| unavailable(e.to_string()))?,
            *library
                .get::<PamStep>(b"pam_end\0")
                .map_err(|e| unavailable(e.to_string()))?,
            *library
                .get::<PamSetItem>(b"pam_set_item\0")
                .map_err(|e| unavailable(e.to_string()))?,
            *library
                .get::<PamStrerror>(b"pam_strerror\0")
                .map_err(|e| unavailable(e.to_string()))?,
        )
    };
    let mut conversation = Box::new(Conversation {
        username: user.clone(),
        password,
        password_given: false,
        messages: Vec::new(),
    });
    let conv = PamConv {
        conv: converse,
        appdata: &mut *conversation as *mut Conversation as *mut c_void,
    };
    let mut handle: *mut c_void = ptr::null_mut();
    // SAFETY: valid NUL-terminated strings and a conversation that outlive the handle
    // (`pam_end` below runs before they are dropped).
    let rc = unsafe { start(service.as_ptr(), user.as_ptr(), &conv, &mut handle) };
    if rc != PAM_SUCCESS || handle.is_null() {
        return Err(unavailable(format!("pam_start failed ({rc})")));
    }
    if let Some(rhost) = &rhost {
        // SAFETY: PAM copies the string.
        unsafe { set_item(handle, PAM_RHOST, rhost.as_ptr() as *const c_void) };
    }
    // SAFETY: `handle` came from pam_start and is ended once, below.
    let mut rc = unsafe { auth(handle, PAM_DISALLOW_NULL_AUTHTOK) };
    let mut step_acct = false;
    if rc == PAM_SUCCESS {
        step_acct = true;
        // SAFETY: as above.
        rc = unsafe { acct(handle, PAM_DISALLOW_NULL_AUTHTOK) };
    }
    let words = if rc == PAM_SUCCESS {
        String::new()
    } else {
        // SAFETY: pam_strerror returns a static string for the handle.
        let text = unsafe { strerror(handle, rc) };
        if text.is_null() {
            format!("PAM error {rc}")
        } else {
            // SAFETY: a NUL-terminated string owned by PAM, copied at once.
            unsafe { CStr::from_ptr(text) }
                .to_string_lossy()
                .into_owned()
        }
    };
    // SAFETY: the handle from pam_start, ended once.
    unsafe { end(handle, rc) };
    // The password's bytes are wiped before they are freed.
    let mut bytes = std::mem::take(&mut conversation.password).into_bytes_with_nul();
    // SAFETY: a writable buffer of `bytes.len()` bytes that we own.
    unsafe { libc::explicit_bzero(bytes.as_mut_ptr() as *mut c_void, bytes.len()) };
    let said = conversation.messages.join("; ");
    let with_said = |w: String| {
        if said.is_empty() {
            w
        } else {
            format!("{w} ({said})")
        }
    };
    match (step_acct, rc) {
        (_, PAM_SUCCESS) => Ok(()),
        (
            false,
            PAM_AUTH_ERR
            | PAM_USER_UNKNOWN
            | PAM_MAXTRIES
            | PAM_CONV_ERR
            | PAM_PERM_DENIED
            | PAM_CRED_INSUFFICIENT,
        ) => Err(Refused::Credentials),
        // The modules could not check at all (an unreadable shadow file, a broken stack):
        // say so, never "wrong password".
        (false, _) => Err(Refused::Unavailable(with_said(words))),
        (true, PAM_NEW_AUTHTOK_REQD) => Err(Refused::PasswordExpired),
        (true, _) => Err(Refused::Account(with_said(words))),
    }
}
