// The load generator of the front-door benchmark (one process, Node's `net` and `http` only).
//
//   node load.mjs '{"mode": ..., "host": "127.0.0.1", "port": N, "headers": {...}, ...}'
//
// Prints one JSON line with the result. Modes:
//   rtt    one WebSocket; `count` sequential round trips of `size` bytes (after `warmup`);
//          -> {"rtt_us": [p50, mean, p90, p99], "samples": n}
//   multi  `connections` WebSockets, each doing sequential round trips of `size` bytes for
//          `seconds` (after `warmup_s`, not counted) -> {"msgs_per_s", "per_connection_min", ...}
//   bulk   one WebSocket; sequential echoes of `size` bytes (1 MiB) for `seconds` (after one
//          warm-up echo) -> {"mib_per_s": payload echoed per second, "echoes"}
//   get    one keep-alive HTTP/1.1 connection; `count` GETs of `path` (after `warmup`), body
//          read and counted -> {"seconds": [p50, mean, min, max], "bytes"}
// Client frames are masked (as the protocol requires) with a fixed key, computed once per size,
// so the client's own cost is the same on every path.
import crypto from 'node:crypto';
import http from 'node:http';
import net from 'node:net';

const opts = JSON.parse(process.argv[2]);
const now = () => Number(process.hrtime.bigint()) / 1e3; // microseconds

function maskedFrame(size, opcode = 0x2) {
  const payload = crypto.randomBytes(size);
  const mask = Buffer.from([0x12, 0x34, 0x56, 0x78]);
  let head;
  if (size < 126) head = Buffer.from([0x80 | opcode, 0x80 | size]);
  else if (size < 65536) { head = Buffer.alloc(4); head[0] = 0x80 | opcode; head[1] = 0x80 | 126; head.writeUInt16BE(size, 2); }
  else { head = Buffer.alloc(10); head[0] = 0x80 | opcode; head[1] = 0x80 | 127; head.writeBigUInt64BE(BigInt(size), 2); }
  for (let i = 0; i < size; i++) payload[i] ^= mask[i & 3];
  return Buffer.concat([head, mask, payload]);
}

function connectWs(target = '/ws') {
  return new Promise((resolve, reject) => {
    const sock = net.connect(opts.socket ? { path: opts.socket } : { host: opts.host, port: opts.port });
    sock.setNoDelay(true);
    const key = crypto.randomBytes(16).toString('base64');
    const extra = Object.entries(opts.headers || {}).map(([k, v]) => `${k}: ${v}\r\n`).join('');
    sock.once('connect', () => sock.write(
      `GET ${target} HTTP/1.1\r\nHost: ${opts.host}:${opts.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n` +
      `Sec-WebSocket-Key: ${key}\r\nSec-WebSocket-Version: 13\r\n` +
      // as a browser does: the front door takes a cookie WebSocket only from its public origin
      `Origin: http://${opts.host}:${opts.port}\r\n${extra}\r\n`));
    let buf = Buffer.alloc(0);
    const onData = (d) => {
      buf = Buffer.concat([buf, d]);
      const end = buf.indexOf('\r\n\r\n');
      if (end < 0) return;
      sock.off('data', onData);
      const head = buf.subarray(0, end).toString('latin1');
      if (!head.startsWith('HTTP/1.1 101')) { sock.destroy(); reject(new Error(`no 101: ${head.split('\r\n')[0]}`)); return; }
      resolve({ sock, rest: buf.subarray(end + 4) });
    };
    sock.on('data', onData);
    sock.once('error', reject);
  });
}

// Calls onMessage(payloadLength) for every complete frame from the server (unmasked frames).
function frameReader(sock, rest, onMessage) {
  let need = 0; // payload bytes of the current frame still to come
  let current = 0;
  let hb = null; // a frame head split across reads
  const headLength = (b1) => { const n = b1 & 0x7f; return n === 126 ? 4 : n === 127 ? 10 : 2; };
  const payloadLength = (h) => { const n = h[1] & 0x7f; return n === 126 ? h.readUInt16BE(2) : n === 127 ? Number(h.readBigUInt64BE(2)) : n; };
  const start = (n) => { current = n; need = n; if (n === 0) onMessage(0); };
  const feed = (d) => {
    let off = 0;
    while (off < d.length) {
      if (need > 0) {
        const k = Math.min(need, d.length - off);
        need -= k; off += k;
        if (need === 0) onMessage(current);
        continue;
      }
      if (hb === null && d.length - off >= 2 && d.length - off >= headLength(d[off + 1])) {
        const hl = headLength(d[off + 1]);
        const n = payloadLength(d.subarray(off, off + hl));
        off += hl;
        start(n);
        continue;
      }
      // slow path: a head split across reads, gathered byte by byte
      hb = hb === null ? Buffer.from([d[off]]) : Buffer.concat([hb, d.subarray(off, off + 1)]);
      off += 1;
      if (hb.length >= 2 && hb.length === headLength(hb[1])) {
        const n = payloadLength(hb);
        hb = null;
        start(n);
      }
    }
  };
  if (rest.length) feed(rest);
  sock.on('data', feed);
}

function pct(sorted, p) {
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(p * sorted.length) - 1))];
}

async function rtt() {
  const { sock, rest } = await connectWs();
  const frame = maskedFrame(opts.size);
  const total = opts.warmup + opts.count;
  const samples = [];
  await new Promise((resolve) => {
    let i = 0; let t0 = 0;
    frameReader(sock, rest, () => {
      if (i >= opts.warmup) samples.push(now() - t0);
      i += 1;
      if (i === total) { resolve(); return; }
      t0 = now(); sock.write(frame);
    });
    t0 = now(); sock.write(frame);
  });
  sock.destroy();
  samples.sort((a, b) => a - b);
  const mean = samples.reduce((a, b) => a + b, 0) / samples.length;
  return { rtt_us: [pct(samples, 0.5), mean, pct(samples, 0.9), pct(samples, 0.99)], samples: samples.length, ops: total };
}

async function multi() {
  const conns = await Promise.all(Array.from({ length: opts.connections }, () => connectWs()));
  const frame = maskedFrame(opts.size);
  const counts = new Array(conns.length).fill(0);
  let all = 0; // every round trip, warm-up included (for the proxy's CPU per message)
  let counting = false;
  let stop = false;
  conns.forEach(({ sock, rest }, idx) => {
    frameReader(sock, rest, () => {
      all += 1;
      if (counting) counts[idx] += 1;
      if (!stop) sock.write(frame);
    });
    sock.write(frame);
  });
  await new Promise((r) => setTimeout(r, opts.warmup_s * 1000));
  counting = true;
  const t0 = now();
  await new Promise((r) => setTimeout(r, opts.seconds * 1000));
  counting = false;
  const elapsed = (now() - t0) / 1e6;
  stop = true;
  await new Promise((r) => setTimeout(r, 100));
  conns.forEach(({ sock }) => sock.destroy());
  const total = counts.reduce((a, b) => a + b, 0);
  return { msgs_per_s: total / elapsed, messages: total, ops: all, seconds: elapsed, per_connection_min: Math.min(...counts), per_connection_max: Math.max(...counts) };
}

async function bulk() {
  const { sock, rest } = await connectWs();
  const frame = maskedFrame(opts.size);
  let echoes = 0; let t0 = 0; let elapsed = 0;
  await new Promise((resolve) => {
    let first = true;
    frameReader(sock, rest, (n) => {
      if (n !== opts.size) throw new Error(`echo of ${n} bytes, sent ${opts.size}`);
      if (first) { first = false; t0 = now(); sock.write(frame); return; } // warm-up echo
      echoes += 1;
      elapsed = (now() - t0) / 1e6;
      if (elapsed >= opts.seconds && echoes >= (opts.min_echoes || 3)) { resolve(); return; }
      sock.write(frame);
    });
    sock.write(frame);
  });
  sock.destroy();
  return { mib_per_s: (echoes * opts.size) / 2 ** 20 / elapsed, echoes, ops: echoes + 1, seconds: elapsed };
}

async function get() {
  const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
  const one = () => new Promise((resolve, reject) => {
    const t0 = now();
    const where = opts.socket ? { socketPath: opts.socket } : { host: opts.host, port: opts.port };
    const req = http.request({ ...where, path: opts.path, agent, headers: opts.headers || {} }, (res) => {
      let bytes = 0;
      res.on('data', (d) => { bytes += d.length; });
      res.on('end', () => {
        if (res.statusCode !== 200) reject(new Error(`status ${res.statusCode}`));
        else resolve({ seconds: (now() - t0) / 1e6, bytes });
      });
      res.on('error', reject);
    });
    req.on('error', reject);
    req.end();
  });
  for (let i = 0; i < opts.warmup; i++) await one();
  const times = [];
  let bytes = 0;
  for (let i = 0; i < opts.count; i++) { const r = await one(); times.push(r.seconds); bytes = r.bytes; }
  agent.destroy();
  times.sort((a, b) => a - b);
  return { seconds: [pct(times, 0.5), times.reduce((a, b) => a + b, 0) / times.length, times[0], times[times.length - 1]], bytes,
    ops: opts.count + opts.warmup };
}

// One echo of each size, compared byte for byte with what was sent (every path, before measuring).
async function verify() {
  const { sock, rest } = await connectWs();
  const sizes = [100, 70000, 1 << 20];
  const got = [];
  let buf = Buffer.from(rest);
  sock.on('data', (d) => { buf = Buffer.concat([buf, d]); });
  for (const size of sizes) {
    const payload = crypto.randomBytes(size);
    const mask = crypto.randomBytes(4);
    const head = size < 126 ? Buffer.from([0x82, 0x80 | size]) : size < 65536 ? Buffer.from([0x82, 0x80 | 126, size >> 8, size & 255])
      : Buffer.concat([Buffer.from([0x82, 0x80 | 127]), (() => { const b = Buffer.alloc(8); b.writeBigUInt64BE(BigInt(size)); return b; })()]);
    const masked = Buffer.from(payload.map((b, i) => b ^ mask[i & 3]));
    sock.write(Buffer.concat([head, mask, masked]));
    const hl = size < 126 ? 2 : size < 65536 ? 4 : 10;
    const deadline = Date.now() + 10000;
    while (buf.length < hl + size) {
      if (Date.now() > deadline) throw new Error(`no echo of ${size} bytes`);
      await new Promise((r) => setTimeout(r, 5));
    }
    const echoed = buf.subarray(hl, hl + size);
    if ((buf[0] & 0x0f) !== 0x2 || !echoed.equals(payload)) throw new Error(`echo of ${size} bytes differs`);
    got.push(size);
    buf = buf.subarray(hl + size);
  }
  sock.destroy();
  return { verified: got };
}

const modes = { rtt, multi, bulk, get, verify };
try {
  const result = await modes[opts.mode]();
  process.stdout.write(JSON.stringify({ ok: true, ...result }) + '\n');
  process.exit(0);
} catch (err) {
  process.stdout.write(JSON.stringify({ ok: false, error: String(err && err.stack || err) }) + '\n');
  process.exit(1);
}
