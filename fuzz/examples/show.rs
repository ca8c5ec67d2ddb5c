//! Prints a `broker_requests` input as the harness reads it (control operations, decoded
//! requests, how the stream ends), to read a crash: `cargo run --example show -- FILE`.

use stoa::wire::Request;
use stoa_executor::codec;
use stoa_fuzz::records::{self, Record};
use stoa_fuzz::stream::{reference_frames, End};

fn main() {
    let path = std::env::args().nth(1).expect("usage: show FILE");
    let data = std::fs::read(path).expect("read the input");
    let Some((seed, recs)) = records::parse(&data) else {
        return println!("empty input");
    };
    println!("chunk seed {seed}");
    for r in &recs {
        if let Record::Control(op) = r {
            println!("C {op:?}");
            continue;
        }
        let (pick, frame) = records::frame_on(r);
        // A structured request may pick its link; else it goes where the last `On` said.
        let on = pick.map_or(String::new(), |l| format!(" on {l:?}"));
        let framed = reference_frames(&frame);
        for p in framed.payloads {
            match codec::decode::<Request>(p) {
                Ok(req) => {
                    let body: String = format!("{:?}", req.body).chars().take(300).collect();
                    println!("R{on} id={} request_id={:?} {body}", req.id, req.request_id);
                }
                Err(e) => println!("R{on} {e}"),
            }
        }
        if framed.end != End::Clean {
            println!("  (the frame ends {:?})", framed.end);
        }
    }
}
