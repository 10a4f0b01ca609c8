//! The node against embedded-hal-mock (exact I2C transactions) and against the tract engine run
//! directly on the same images; UDP publishing to 127.0.0.1. No timing assertions.

use embedded_hal_mock::eh1::i2c::{Mock, Transaction};
use perceiver_edge_runtime::{npy, tensor, to_vec, Session};
use perception_node::node::{self, Classifier, Config};
use perception_node::publish::{Memory, Udp};
use perception_node::sensor::{reg, Amg8833, PIXELS};
use perception_node::sim::SimulatedAmg8833;
use serde_json::Value;
use std::path::{Path, PathBuf};

const ADDR: u8 = 0x69;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// models/digits exported with default options (once per test binary).
fn digits_onnx() -> PathBuf {
    static ONCE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("perception-node-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("digits.onnx");
        let opts = perceiver_edge_export::ExportOptions::default();
        perceiver_edge_export::export(&root().join("models/digits"), &opts).unwrap().write(&path).unwrap();
        path
    })
    .clone()
}

fn heldout(n: usize) -> (Vec<Vec<f32>>, Vec<i64>) {
    let x = npy::read_npy(&root().join("models/digits/samples/heldout_inputs.npy")).unwrap();
    let y = npy::read_npy(&root().join("models/digits/samples/heldout_labels.npy")).unwrap();
    let per: usize = x.shape()[1..].iter().product();
    let xs = to_vec::<f32>(&x).unwrap().chunks(per).take(n).map(|c| c.to_vec()).collect();
    (xs, to_vec::<i64>(&y).unwrap()[..n].to_vec())
}

fn init_transactions() -> Vec<Transaction> {
    vec![
        Transaction::write(ADDR, vec![reg::PCTL, 0x00]),
        Transaction::write(ADDR, vec![reg::RST, 0x3F]),
        Transaction::write(ADDR, vec![reg::FPSC, 0x00]),
    ]
}

#[test]
fn driver_decodes_datasheet_pixel_values() {
    // AMG8833 datasheet table: 12-bit two's complement, 0.25 degC per LSB.
    let table: [(u16, f32); 7] =
        [(0x1F4, 125.0), (0x064, 25.0), (0x001, 0.25), (0x000, 0.0), (0xFFF, -0.25), (0xF9C, -25.0), (0xF24, -55.0)];
    let mut bytes = vec![0u8; 2 * PIXELS];
    for (i, (word, _)) in table.iter().enumerate() {
        bytes[2 * i] = (word & 0xFF) as u8;
        bytes[2 * i + 1] = (word >> 8) as u8;
    }
    let mut exp = init_transactions();
    exp.push(Transaction::write_read(ADDR, vec![0x80], bytes));
    let mut bus = Mock::new(&exp);
    let mut sensor = Amg8833::new(bus.clone(), ADDR);
    sensor.init().unwrap();
    let mut t = [f32::NAN; PIXELS];
    sensor.read_frame(&mut t).unwrap();
    for (i, (_, want)) in table.iter().enumerate() {
        assert_eq!(t[i], *want, "pixel {i}");
    }
    assert!(t[table.len()..].iter().all(|&v| v == 0.0));
    bus.done();
}

#[test]
fn simulated_sensor_round_trips_quarter_degrees() {
    let frame: [f32; PIXELS] = std::array::from_fn(|i| -30.0 + 0.25 * (i as f32 * 7.0));
    let mut sensor = Amg8833::new(SimulatedAmg8833::new(ADDR, vec![frame]), ADDR);
    sensor.init().unwrap();
    let mut t = [0f32; PIXELS];
    sensor.read_frame(&mut t).unwrap();
    assert_eq!(t, frame);
    assert!(Amg8833::new(SimulatedAmg8833::new(0x68, vec![frame]), ADDR).read_frame(&mut t).is_err());
}

/// Frames through the mocked bus -> queue -> engine give, frame by frame, the class the engine
/// gives on the same image run directly; the summary counts and accuracy agree with the lines.
#[test]
fn node_on_mock_bus_matches_direct_engine() {
    const N: usize = 24;
    let (images, labels) = heldout(N);
    let mut direct = Session::load(&digits_onnx()).unwrap();
    let want: Vec<usize> = images
        .iter()
        .map(|img| {
            let out = direct.run(vec![tensor(&[1, 3, 8, 8], img).unwrap()]).unwrap();
            let l = to_vec::<f32>(&out[0]).unwrap();
            (0..l.len()).max_by(|&a, &b| l[a].total_cmp(&l[b])).unwrap()
        })
        .collect();

    // The sensor reports 20 degC + 16 degC * pixel, in 0.25 degC steps: raw = 80 + 64 * pixel.
    let mut exp = init_transactions();
    for img in &images {
        let mut bytes = Vec::with_capacity(2 * PIXELS);
        for p in &img[..PIXELS] {
            let raw = (80.0 + 64.0 * p).round() as u16;
            bytes.extend_from_slice(&raw.to_le_bytes());
        }
        exp.push(Transaction::write_read(ADDR, vec![0x80], bytes));
    }
    let mut bus = Mock::new(&exp);
    let mut classifier = Classifier::new(Session::load(&digits_onnx()).unwrap()).unwrap();
    let cfg = Config { rate_hz: 60.0, frames: N as u32, ..Config::default() };
    let mut sink = Memory::default();
    let summary = node::run(Amg8833::new(bus.clone(), ADDR), &mut classifier, &cfg, &mut sink, Some(&labels)).unwrap();
    bus.done();

    let lines: Vec<Value> = sink.0.iter().map(|l| serde_json::from_str(l).unwrap()).collect();
    let (frames, last) = lines.split_at(lines.len() - 1);
    let s = &last[0]["summary"];
    assert_eq!(s["frames"], N);
    assert_eq!(s["published"].as_u64().unwrap() + s["dropped"].as_u64().unwrap(), N as u64);
    assert_eq!(frames.len() as u64, s["published"].as_u64().unwrap());
    assert!(!frames.is_empty());
    let mut correct = 0;
    for f in frames {
        let seq = f["seq"].as_u64().unwrap() as usize;
        assert_eq!(f["class"].as_u64().unwrap() as usize, want[seq], "frame {seq}");
        correct += usize::from(want[seq] as i64 == labels[seq]);
        let score = f["score"].as_f64().unwrap();
        assert!(score > 0.0 && score <= 1.0);
    }
    assert_eq!(summary.correct as usize, correct);
    let acc = s["accuracy"].as_f64().unwrap();
    assert!((acc - correct as f64 / frames.len() as f64).abs() < 1e-4);
    let misses = frames.iter().filter(|f| f["deadline_miss"].as_bool().unwrap()).count();
    assert_eq!(s["deadline_misses"].as_u64().unwrap(), misses as u64);
    let lat = &s["latency_us"];
    assert!(lat["p50"].as_u64() <= lat["p90"].as_u64() && lat["p90"].as_u64() <= lat["p99"].as_u64());
    assert!(lat["p99"].as_u64() <= lat["max"].as_u64());
}

#[test]
fn publishes_json_lines_over_udp_on_localhost() {
    let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    rx.set_read_timeout(Some(std::time::Duration::from_secs(30))).unwrap();
    let (images, _) = heldout(4);
    let frames: Vec<[f32; PIXELS]> = images.iter().map(|img| std::array::from_fn(|i| 20.0 + 16.0 * img[i])).collect();
    let mut classifier = Classifier::new(Session::load(&digits_onnx()).unwrap()).unwrap();
    let mut sink = Udp::new(rx.local_addr().unwrap()).unwrap();
    let cfg = Config { rate_hz: 100.0, frames: 4, ..Config::default() };
    let summary =
        node::run(Amg8833::new(SimulatedAmg8833::new(ADDR, frames), ADDR), &mut classifier, &cfg, &mut sink, None)
            .unwrap();
    let mut buf = [0u8; 2048];
    let mut got = Vec::new();
    for _ in 0..=summary.published {
        let n = rx.recv(&mut buf).unwrap();
        got.push(serde_json::from_slice::<Value>(&buf[..n]).unwrap());
    }
    assert_eq!(got.len() as u32, summary.published + 1);
    assert!(got.last().unwrap().get("summary").is_some());
    assert!(got[0].get("class").is_some());
}

#[test]
fn rejects_a_model_that_is_not_8x8() {
    let dir = std::env::temp_dir().join(format!("perception-node-test-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("digits16.onnx");
    let opts = perceiver_edge_export::ExportOptions { image_size: Some((16, 16)), ..Default::default() };
    perceiver_edge_export::export(&root().join("models/digits"), &opts).unwrap().write(&path).unwrap();
    let err = Classifier::new(Session::load(&path).unwrap()).err().unwrap().to_string();
    assert!(err.contains("[1, C, 8, 8]"), "{err}");
}
