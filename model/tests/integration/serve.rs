//! `llava-med serve` as a client sees it: the real binary on the tiny fixture model, spoken to over raw
//! HTTP/1.1 (so malformed bodies, disconnects and slow readers can be produced at will) and through the
//! real `openai` Python package.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};

use crate::common::{fixture, llava_med, llava_med_ok, required_test_data, test_data};

const MODEL: &str = "tiny-llava-med-mistral";

/// A running server; killed when dropped.
struct Server {
    child: Child,
    port: u16,
    stdin: Option<ChildStdin>,
    stderr: Arc<Mutex<String>>,
}

impl Server {
    fn start(extra: &[&str]) -> Self {
        Self::start_env(extra, &[])
    }

    fn start_env(extra: &[&str], env: &[(&str, &str)]) -> Self {
        let mut child = llava_med()
            .args(["serve", "--model"])
            .arg(fixture(MODEL))
            .args(["--device", "cpu", "--port", "0"])
            .args(extra)
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err = child.stderr.take().unwrap();
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let ready: Value = serde_json::from_str(&line).unwrap_or_else(|_| {
            panic!(
                "no ready line: {line:?}; stderr: {}",
                stderr.lock().unwrap()
            )
        });
        assert_eq!(ready["event"], "ready");
        assert_eq!(ready["model"], MODEL);
        let stdin = child.stdin.take();
        Self {
            port: ready["port"].as_u64().unwrap() as u16,
            child,
            stdin,
            stderr,
        }
    }

    fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        s
    }

    /// One request; returns status, headers (lower-case names) and the de-chunked body.
    fn request(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Response {
        let mut s = self.connect();
        send_request(&mut s, method, path, headers, body);
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).unwrap();
        Response::parse(&raw)
    }

    fn post(&self, body: &Value) -> Response {
        self.request(
            "POST",
            "/v1/chat/completions",
            &[],
            body.to_string().as_bytes(),
        )
    }

    fn health(&self) -> Value {
        let r = self.request("GET", "/health", &[], b"");
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
    }

    fn rss_kb(&self) -> u64 {
        self.status_kb("VmRSS:")
    }

    /// A `kB` line of the server's `/proc/PID/status` (`VmRSS:`, `VmHWM:` …).
    fn status_kb(&self, key: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    /// Waits for the process to end, at most `limit`; returns its exit code and how long it took.
    fn wait_exit(&mut self, limit: Duration) -> (Option<i32>, Duration) {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status.code(), start.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "the server did not exit within {limit:?}; stderr: {}",
            self.stderr.lock().unwrap()
        );
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn send_request(
    s: &mut TcpStream,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) {
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        head.push_str("Content-Type: application/json\r\n");
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    // The server may answer (413, 401) before reading a large body and close: a write error is fine.
    let _ = s.write_all(body);
}

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn parse(raw: &[u8]) -> Self {
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| panic!("no HTTP head in {:?}", String::from_utf8_lossy(raw)));
        let head = String::from_utf8_lossy(&raw[..split]).to_string();
        let mut lines = head.lines();
        let status = lines
            .next()
            .unwrap()
            .split(' ')
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let mut body = raw[split + 4..].to_vec();
        if headers
            .iter()
            .any(|(k, v)| k == "transfer-encoding" && v == "chunked")
        {
            body = dechunk(&body);
        }
        Self {
            status,
            headers,
            body,
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).to_string()
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    /// The `data:` payloads of an SSE body.
    fn sse_data(&self) -> Vec<String> {
        self.text()
            .lines()
            .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
            .map(str::to_string)
            .collect()
    }

    /// Asserts an OpenAI-format error with this status and code.
    fn assert_error(&self, status: u16, code: &str) -> String {
        let j = self.json();
        assert_eq!(self.status, status, "{j}");
        assert_eq!(j["error"]["code"], code, "{j}");
        assert!(j["error"]["type"].is_string(), "{j}");
        j["error"]["message"].as_str().unwrap().to_string()
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size_str = String::from_utf8_lossy(&b[..eol]);
        let size = usize::from_str_radix(size_str.split(';').next().unwrap().trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + size]);
        b = &b[eol + 2 + size + 2..];
    }
}

fn image_path() -> PathBuf {
    fixture(&format!("{MODEL}/image.png"))
}

fn data_url(path: &Path, mime: &str) -> String {
    let bytes = std::fs::read(path).unwrap();
    format!(
        "data:{mime};base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

fn chat_body(prompt: &str, image_url: Option<Value>, max_tokens: usize, stream: bool) -> Value {
    let mut content = vec![json!({"type": "text", "text": prompt})];
    if let Some(u) = image_url {
        content.push(json!({"type": "image_url", "image_url": u}));
    }
    json!({"model": MODEL, "messages": [{"role": "user", "content": content}],
           "temperature": 0, "max_tokens": max_tokens, "stream": stream,
           "stream_options": {"include_usage": true}})
}

/// `llava-med generate --json` on the same input: the reference answer.
fn generate_json(prompt: &str, image: &Path, extra: &[&str], max_tokens: usize) -> Value {
    let max_tokens = max_tokens.to_string();
    let mut args: Vec<OsString> = ["generate", "--json", "--device", "cpu", "--model"]
        .map(OsString::from)
        .to_vec();
    args.push(fixture(MODEL).into());
    for a in [
        "--prompt",
        prompt,
        "--max-new-tokens",
        &max_tokens,
        "--image",
    ] {
        args.push(a.into());
    }
    args.push(image.into());
    args.extend(extra.iter().map(OsString::from));
    serde_json::from_slice(&llava_med_ok(args)).unwrap()
}

/// Text, finish reason and usage of a streamed answer.
fn collect_stream(r: &Response) -> (String, String, Value) {
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.header("content-type")
            .unwrap()
            .starts_with("text/event-stream")
    );
    let data = r.sse_data();
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{data:?}");
    let mut text = String::new();
    let (mut finish, mut usage) = (String::new(), Value::Null);
    for d in &data[..data.len() - 1] {
        let chunk: Value = serde_json::from_str(d).unwrap();
        assert_eq!(chunk["object"], "chat.completion.chunk", "{chunk}");
        if let Some(c) = chunk["choices"][0]["delta"]["content"].as_str() {
            text.push_str(c);
        }
        if let Some(f) = chunk["choices"][0]["finish_reason"].as_str() {
            finish = f.to_string();
        }
        if !chunk["usage"].is_null() {
            usage = chunk["usage"].clone();
        }
    }
    (text, finish, usage)
}

#[test]
fn answers_equal_generate_streamed_or_not_with_png_and_dicom() {
    let server = Server::start(&[]);
    let prompt = "What does this image show?";
    let want = generate_json(prompt, &image_path(), &[], 12);
    let url = json!({"url": data_url(&image_path(), "image/png")});

    let r = server.post(&chat_body(prompt, Some(url.clone()), 12, false));
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    assert_eq!(j["object"], "chat.completion");
    assert_eq!(j["choices"][0]["message"]["content"], want["text"]);
    assert_eq!(j["choices"][0]["finish_reason"], want["finish_reason"]);
    assert_eq!(j["usage"]["prompt_tokens"], want["prompt_tokens"]);
    assert_eq!(j["usage"]["completion_tokens"], want["completion_tokens"]);
    // The prompt's positions: its tokens (one of them the image slot) + the image's embeddings.
    let model = fixture(MODEL);
    let tokens = llava_med_ok([
        "tokenize",
        "--template",
        "mistral_instruct",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        &format!("<image>\n{prompt}"),
    ]);
    let ids: Vec<i64> = serde_json::from_slice(&tokens).unwrap();
    let per_image = 16; // (56 px / 14 px patches)² in the fixture
    assert_eq!(
        j["usage"]["prompt_tokens"].as_u64().unwrap() as usize,
        ids.len() - 1 + per_image
    );
    assert_eq!(j["usage"]["completion_tokens"], 12);
    assert_eq!(j["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    assert_eq!(j["choices"][0]["finish_reason"], "length");

    let r = server.post(&chat_body(prompt, Some(url), 12, true));
    let (text, finish, usage) = collect_stream(&r);
    assert_eq!(text, want["text"].as_str().unwrap());
    assert_eq!(finish, "length");
    assert_eq!(usage["prompt_tokens"], j["usage"]["prompt_tokens"]);
    assert_eq!(usage["completion_tokens"], j["usage"]["completion_tokens"]);
    // The same prompt again: all of it but its last position came from the prompt cache.
    assert_eq!(
        usage["prompt_tokens_details"]["cached_tokens"],
        ids.len() - 1 + per_image - 1
    );

    // DICOM bytes with the window extension field = `generate --image X.dcm --window lung`.
    if let Some(dcm) = required_test_data("dicom/pydicom/CT_small.dcm") {
        let want = generate_json(prompt, &dcm, &["--window", "lung"], 8);
        let url = json!({"url": data_url(&dcm, "application/dicom"), "window": "lung"});
        let j = server.post(&chat_body(prompt, Some(url), 8, false)).json();
        assert_eq!(j["choices"][0]["message"]["content"], want["text"], "{j}");
        let other = json!({"url": data_url(&dcm, "application/dicom"), "window": "bone"});
        let bone = server
            .post(&chat_body(prompt, Some(other), 8, false))
            .json();
        assert_eq!(bone["usage"]["prompt_tokens"], j["usage"]["prompt_tokens"]);
        // Other pixels: only the text before the image is reused.
        let cached = bone["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64();
        assert!(cached.unwrap() < ids.len() as u64, "{bone}");
    }

    let models = server.request("GET", "/v1/models", &[], b"").json();
    assert_eq!(models["data"][0]["id"], MODEL);
    assert_eq!(
        server.health()["queue"]["completed"].as_u64(),
        Some(if test_data("dicom/pydicom/CT_small.dcm").is_some() {
            4
        } else {
            2
        })
    );
}

#[test]
fn the_openai_python_client_talks_to_the_server() {
    let Some(site) = required_test_data("python-openai") else {
        return;
    };
    let server = Server::start(&[]);
    let prompt = "Describe the image.";
    let want = generate_json(prompt, &image_path(), &[], 10);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/integration/openai_client.py");
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let out = Command::new(python)
        .arg(script)
        .args([
            &format!("http://127.0.0.1:{}/v1", server.port),
            MODEL,
            image_path().to_str().unwrap(),
            prompt,
            "10",
        ])
        .env("PYTHONPATH", site)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        server.stderr.lock().unwrap()
    );
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    for mode in ["nonstream", "stream"] {
        assert_eq!(got[mode]["text"], want["text"], "{mode}: {got}");
        assert_eq!(got[mode]["finish_reason"], want["finish_reason"], "{mode}");
        assert_eq!(got[mode]["prompt_tokens"], want["prompt_tokens"], "{mode}");
        assert_eq!(
            got[mode]["completion_tokens"], want["completion_tokens"],
            "{mode}"
        );
    }
    assert_eq!(got["models"], json!([MODEL]));
    assert_eq!(got["unknown_model_status"], 404);
    assert_eq!(got["bad_image_status"], 400);
}

#[test]
fn sixteen_clients_against_a_queue_of_eight_all_end_correctly() {
    let server = Arc::new(Server::start(&["--max-queue", "8"]));
    let prompts = [
        "What is this?",
        "Is there a fracture?",
        "Describe it.",
        "Which organ?",
    ];
    let url = json!({"url": data_url(&image_path(), "image/png")});
    let body = |p: &str| chat_body(p, Some(url.clone()), 24, false);
    // Sequential answers (also the warm-up), then the idle memory.
    let sequential: Vec<Value> = prompts
        .iter()
        .map(|p| {
            let r = server.post(&body(p));
            assert_eq!(r.status, 200, "{}", r.text());
            r.json()["choices"][0]["message"]["content"].clone()
        })
        .collect();
    let idle = server.rss_kb();
    let mut threads = Vec::new();
    for client in 0..16 {
        let server = server.clone();
        let bodies: Vec<(usize, Value)> = (0..4)
            .map(|k| {
                (
                    (client + k) % prompts.len(),
                    body(prompts[(client + k) % prompts.len()]),
                )
            })
            .collect();
        threads.push(std::thread::spawn(move || {
            bodies
                .into_iter()
                .map(|(p, b)| {
                    let r = server.post(&b);
                    (
                        p,
                        r.status,
                        r.header("retry-after").map(str::to_string),
                        r.json(),
                    )
                })
                .collect::<Vec<_>>()
        }));
    }
    let (mut ok, mut busy) = (0, 0);
    for t in threads {
        for (p, status, retry, j) in t.join().unwrap() {
            match status {
                200 => {
                    assert_eq!(j["choices"][0]["message"]["content"], sequential[p]);
                    ok += 1;
                }
                429 => {
                    assert_eq!(j["error"]["code"], "queue_full");
                    assert_eq!(retry.as_deref(), Some("1"));
                    busy += 1;
                }
                other => panic!("status {other}: {j}"),
            }
        }
    }
    assert_eq!(ok + busy, 64);
    let health = server.health();
    let q = &health["queue"];
    assert_eq!(q["completed"].as_u64().unwrap(), 4 + ok as u64, "{health}");
    assert_eq!(q["rejected"].as_u64().unwrap(), busy as u64, "{health}");
    assert_eq!(
        (q["running"].as_u64(), q["waiting"].as_u64()),
        (Some(0), Some(0))
    );
    let after = server.rss_kb();
    eprintln!(
        "load: {ok} answered, {busy} refused with 429; RSS idle {} MB, after {} MB",
        idle / 1024,
        after / 1024
    );
    // Freed memory may stay with the allocator in small amounts; growth per request would show here.
    assert!(
        after < idle + idle / 4 + 32 * 1024,
        "RSS {idle} kB idle, {after} kB after the load"
    );
}

#[test]
fn every_bad_request_gets_its_status_and_the_server_stays_up() {
    let server = Server::start(&["--max-image-mb", "1"]);
    let png = json!({"url": data_url(&image_path(), "image/png")});
    let post_raw = |b: &[u8]| server.request("POST", "/v1/chat/completions", &[], b);
    post_raw(b"{\"model\": ").assert_error(400, "invalid_json");
    post_raw(b"[1,2]").assert_error(400, "invalid_request");
    let mut body = chat_body("Hi", Some(png.clone()), 4, false);
    body["model"] = json!("gpt-4o");
    let m = server.post(&body).assert_error(404, "model_not_found");
    assert!(m.contains(MODEL), "{m}");
    let bad = |url: &str| chat_body("Hi", Some(json!({ "url": url })), 4, false);
    server
        .post(&bad("data:image/png;base64,!!!"))
        .assert_error(400, "invalid_base64");
    let m = server
        .post(&bad("data:image/png;base64,aGVsbG8gd29ybGQ="))
        .assert_error(400, "invalid_image");
    assert!(m.contains("image 1"), "{m}");
    server
        .post(&bad("https://example.org/ct.png"))
        .assert_error(400, "remote_image_refused");
    server
        .post(&bad("file:///etc/passwd"))
        .assert_error(400, "local_files_refused");
    let big = format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(vec![0u8; 1_200_000])
    );
    server.post(&bad(&big)).assert_error(413, "image_too_large");
    let huge = vec![b' '; 8 << 20];
    post_raw(&huge).assert_error(413, "request_too_large");
    let long = "Describe the anatomy in detail. ".repeat(400);
    let m = server
        .post(&chat_body(&long, Some(png.clone()), 4, false))
        .assert_error(400, "context_length_exceeded");
    assert!(m.contains("2048"), "{m}");
    let mut two = chat_body("Hi", None, 4, false);
    two["n"] = json!(2);
    server.post(&two).assert_error(400, "unsupported_parameter");
    let mut window = chat_body(
        "Hi",
        Some(json!({"url": png["url"], "window": "sideways"})),
        4,
        false,
    );
    server.post(&window).assert_error(400, "invalid_value");
    window["messages"] = json!([{"role": "assistant", "content": "x"}]);
    server.post(&window).assert_error(400, "invalid_request");
    server
        .request("GET", "/v1/chat/completions", &[], b"")
        .assert_error(405, "method_not_allowed");
    server
        .request("GET", "/v2/nothing", &[], b"")
        .assert_error(404, "not_found");
    // Still serving.
    let r = server.post(&chat_body("Hi", Some(png), 3, false));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(server.health()["status"], "ok");
}

/// A small deterministic generator for the fuzz-style test.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn hundreds_of_malformed_bodies_leave_the_server_healthy() {
    let server = Server::start(&[]);
    let valid = chat_body(
        "What is it?",
        Some(json!({"url": data_url(&image_path(), "image/png")})),
        2,
        false,
    )
    .to_string()
    .into_bytes();
    let mut rng = Lcg(7);
    let junk: [&[u8]; 8] = [
        b"{",
        b"}",
        b"\"",
        b"null",
        b"[]",
        b"\x00",
        b"\xff\xfe",
        b"-1e999",
    ];
    let mut bodies: Vec<Vec<u8>> = Vec::new();
    for i in 0..320 {
        let mut b = valid.clone();
        match i % 4 {
            // Truncated.
            0 => b.truncate(rng.below(b.len())),
            // Bytes replaced.
            1 => {
                for _ in 0..1 + rng.below(4) {
                    let at = rng.below(b.len());
                    b[at] = rng.next() as u8;
                }
            }
            // Junk inserted.
            2 => {
                let at = rng.below(b.len());
                let j = junk[rng.below(junk.len())];
                b.splice(at..at, j.iter().copied());
            }
            // Random bytes.
            _ => b = (0..rng.below(200)).map(|_| rng.next() as u8).collect(),
        }
        bodies.push(b);
    }
    let mut statuses = std::collections::BTreeMap::new();
    for b in &bodies {
        let r = server.request("POST", "/v1/chat/completions", &[], b);
        assert!(
            r.status == 200 || (400..500).contains(&r.status),
            "status {} for {:?}: {}",
            r.status,
            String::from_utf8_lossy(b),
            r.text()
        );
        if r.status != 200 {
            assert!(r.json()["error"]["message"].is_string(), "{}", r.text());
        }
        *statuses.entry(r.status).or_insert(0) += 1;
    }
    eprintln!(
        "fuzz: statuses {statuses:?}; server peak RSS {} MB",
        server.status_kb("VmHWM:") / 1024
    );
    assert!(
        statuses.get(&400).copied().unwrap_or(0) > 200,
        "{statuses:?}"
    );
    let health = server.health();
    assert_eq!(health["status"], "ok");
    assert_eq!(health["queue"]["failed"], 0, "{health}");
    let r = server.post(&serde_json::from_slice(&valid).unwrap());
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn an_api_key_is_required_when_set_and_for_non_loopback_addresses() {
    let server = Server::start_env(
        &["--api-key-env", "LLAVA_MED_TEST_KEY"],
        &[("LLAVA_MED_TEST_KEY", "s3cret")],
    );
    for path in ["/v1/models", "/health"] {
        let r = server.request("GET", path, &[], b"");
        r.assert_error(401, "invalid_api_key");
        assert_eq!(r.header("www-authenticate"), Some("Bearer"));
        server
            .request("GET", path, &[("Authorization", "Bearer wrong")], b"")
            .assert_error(401, "invalid_api_key");
        let ok = server.request("GET", path, &[("Authorization", "Bearer s3cret")], b"");
        assert_eq!(ok.status, 200, "{}", ok.text());
    }
    server
        .request(
            "POST",
            "/v1/chat/completions",
            &[],
            chat_body("Hi", None, 2, false).to_string().as_bytes(),
        )
        .assert_error(401, "invalid_api_key");

    let out = llava_med()
        .args(["serve", "--device", "cpu", "--host", "0.0.0.0", "--model"])
        .arg(fixture(MODEL))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("without an API key"), "{stderr}");
    assert!(out.stdout.is_empty());
    let out = llava_med()
        .args([
            "serve",
            "--device",
            "cpu",
            "--api-key-env",
            "LLAVA_MED_UNSET_KEY",
            "--model",
        ])
        .arg(fixture(MODEL))
        .env_remove("LLAVA_MED_UNSET_KEY")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("LLAVA_MED_UNSET_KEY is not set"));
}

/// A request for a long answer: seeded sampling that, on the fixture, runs ~3,700 tokens (a few seconds)
/// before an end of sequence, in a server started with `--context 6000`.
fn long_body(stream: bool) -> Value {
    let mut body = chat_body(
        "Tell me everything.",
        Some(json!({"url": data_url(&image_path(), "image/png")})),
        100_000,
        stream,
    );
    body["temperature"] = json!(1.0);
    body["seed"] = json!(1);
    body
}

/// Sends a long request without reading the answer.
fn send_long(server: &Server, stream: bool) -> TcpStream {
    let mut s = server.connect();
    let body = long_body(stream).to_string();
    send_request(&mut s, "POST", "/v1/chat/completions", &[], body.as_bytes());
    s
}

/// Opens a long streaming generation and reads until its first text arrives.
fn start_long_stream(server: &Server) -> TcpStream {
    let mut s = send_long(server, true);
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    while count_content(&seen) < 2 {
        let n = s.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "stream ended early: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    s
}

/// Waits until nothing runs and `cancelled` reaches `n`.
fn wait_cancelled(server: &Server, n: u64) {
    let start = Instant::now();
    loop {
        let q = server.health()["queue"].clone();
        if q["running"] == 0 && q["cancelled"] == n {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "not cancelled: {q}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn count_content(raw: &[u8]) -> usize {
    String::from_utf8_lossy(raw).matches("\"content\":").count()
}

#[test]
fn a_disconnecting_client_cancels_and_sigterm_ends_the_server_quickly() {
    let mut server = Server::start(&["--max-queue", "0", "--context", "6000"]);
    // A client that waits for each answer never finds the queue full (the slot is free before the answer
    // arrives; it once was freed just after, and back-to-back requests got 429s).
    for _ in 0..20 {
        let r = server.post(&chat_body("Hi", None, 1, false));
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let stream = start_long_stream(&server);
    // One running, none may wait.
    let busy = server.post(&chat_body("Hi", None, 2, false));
    busy.assert_error(429, "queue_full");
    assert_eq!(server.health()["queue"]["running"], 1);
    drop(stream);
    wait_cancelled(&server, 1);
    // A non-streaming client that hangs up is cancelled too.
    let s = send_long(&server, false);
    while server.health()["queue"]["running"] != 1 {
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(s);
    wait_cancelled(&server, 2);
    assert_eq!(server.health()["queue"]["completed"], 20);
    // The slot is free again.
    assert_eq!(server.post(&chat_body("Hi", None, 2, false)).status, 200);

    // SIGTERM mid-generation: the stream gets the grace period (2 s), then is cancelled; exit status 0.
    let mut stream = start_long_stream(&server);
    unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) };
    let (code, took) = server.wait_exit(Duration::from_secs(5));
    assert_eq!(code, Some(0), "{}", server.stderr.lock().unwrap());
    eprintln!("SIGTERM during a generation: exited in {took:?}");
    assert!(server.stderr.lock().unwrap().contains("shutting down"));
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
    let rest = String::from_utf8_lossy(&rest);
    assert!(
        rest.contains("shutting_down") && rest.contains("[DONE]"),
        "{rest}"
    );
}

#[test]
fn stdin_eof_stops_the_server_when_asked() {
    let mut server = Server::start(&["--exit-on-stdin-eof"]);
    assert_eq!(server.health()["status"], "ok");
    drop(server.stdin.take());
    let (code, _) = server.wait_exit(Duration::from_secs(5));
    assert_eq!(code, Some(0), "{}", server.stderr.lock().unwrap());
}

/// A two-turn conversation's second turn, as clients send it: the whole conversation again.
fn second_turn(server: &Server, first_answer: &str) -> Value {
    let url = json!({"url": data_url(&image_path(), "image/png")});
    let body = json!({"model": MODEL, "temperature": 0, "max_tokens": 10, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "What does this image show?"},
                                     {"type": "image_url", "image_url": url}]},
        {"role": "assistant", "content": first_answer},
        {"role": "user", "content": "Is there anything abnormal?"}]});
    let r = server.post(&body);
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

#[test]
fn a_follow_up_turn_computes_only_its_new_positions() {
    let first = |server: &Server| {
        let url = json!({"url": data_url(&image_path(), "image/png")});
        server
            .post(&chat_body(
                "What does this image show?",
                Some(url),
                10,
                false,
            ))
            .json()
    };
    let cached = Server::start(&[]);
    let one = first(&cached);
    let answer = one["choices"][0]["message"]["content"].as_str().unwrap();
    let two = second_turn(&cached, answer);
    let uncached = Server::start(&["--no-prompt-cache"]);
    assert_eq!(first(&uncached)["choices"], one["choices"]);
    let want = second_turn(&uncached, answer);
    assert_eq!(want["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    assert_eq!(
        two["choices"], want["choices"],
        "cached and uncached answers differ"
    );
    assert_eq!(
        two["usage"]["prompt_tokens"],
        want["usage"]["prompt_tokens"]
    );
    // At least the first turn's prompt (image included) came from the cache, and not the new question.
    let cached_tokens = two["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    let first_prompt = one["usage"]["prompt_tokens"].as_u64().unwrap();
    let prompt = two["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(
        cached_tokens >= first_prompt && cached_tokens + 5 < prompt,
        "{cached_tokens} cached of {prompt} (first turn {first_prompt})"
    );
}

#[test]
fn prompt_cache_slots_keep_several_conversations() {
    // A second image: the fixture with one pixel changed.
    let mut img = image::open(image_path()).unwrap().to_rgb8();
    img.get_pixel_mut(0, 0).0[0] ^= 1;
    let other = std::env::temp_dir().join(format!("llava-med-slots-{}.png", std::process::id()));
    img.save(&other).unwrap();
    let ask = |server: &Server, path: &Path, question: &str| {
        let url = json!({"url": data_url(path, "image/png")});
        let j = server
            .post(&chat_body(question, Some(url), 4, false))
            .json();
        j["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
    };
    let per_image = 16;
    // Two slots: back to the first image after the second, its positions are still there.
    let two = Server::start(&["--prompt-cache-slots", "2"]);
    ask(&two, &image_path(), "What does this image show?");
    ask(&two, &other, "What does this image show?");
    let cached = ask(&two, &image_path(), "Is it normal?");
    assert!(cached > per_image, "{cached}");
    // One slot (the default): the second image replaced the first.
    let one = Server::start(&[]);
    ask(&one, &image_path(), "What does this image show?");
    ask(&one, &other, "What does this image show?");
    let cached = ask(&one, &image_path(), "Is it normal?");
    assert!(cached < per_image, "{cached}");
    let _ = std::fs::remove_file(other);
}

#[test]
fn prompts_are_not_logged_unless_asked() {
    let secret = "Patient John Q Example, MRN 123456";
    for (flag, logged) in [(None, false), (Some("--log-prompts"), true)] {
        let mut server = Server::start(flag.as_slice());
        assert_eq!(server.post(&chat_body(secret, None, 2, false)).status, 200);
        unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) };
        server.wait_exit(Duration::from_secs(5));
        let log = server.stderr.lock().unwrap().clone();
        assert!(log.contains("chat completion"), "{log}");
        assert_eq!(log.contains(secret), logged, "{log}");
    }
}
