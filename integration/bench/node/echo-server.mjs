// The upstream of the front-door benchmark: HTTP + WebSocket echo, Node's own `http` and `net` only.
//
//   node echo-server.mjs                  serves on the listening socket handed over as fd 3 (LISTEN_FDS=1, as the daemon runs an IDE)
//   node echo-server.mjs --port N         listens on 127.0.0.1:N (for the direct path and for CHP)
//
// GET /              200 "ok" (the daemon's readiness probe)
// GET /bytes/N       200 with N bytes (Content-Length; written from one preallocated buffer)
// Upgrade: websocket 101, then every frame from the client (masked, as clients send them) is sent
//                    back unmasked with the same opcode and payload; close frames are answered and
//                    the connection ends.
//
// The same program serves every path of the benchmark, so the upstream's own cost is the same in
// all of them.
import crypto from 'node:crypto';
import http from 'node:http';

const GUID = '258EAFA5-E914-47DA-95CA-C5AB0DC85B11';
const BLOB = Buffer.alloc(16 * 1024 * 1024, 0x61);

const server = http.createServer((req, res) => {
  const m = /^\/bytes\/(\d+)$/.exec(req.url);
  if (m) {
    const n = Math.min(Number(m[1]), BLOB.length);
    res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': n });
    res.end(BLOB.subarray(0, n));
    return;
  }
  res.writeHead(200, { 'content-type': 'text/plain', 'content-length': 3 });
  res.end('ok\n');
});
server.keepAliveTimeout = 120000;

function frameHead(opcode, n) {
  if (n < 126) return Buffer.from([0x80 | opcode, n]);
  if (n < 65536) {
    const h = Buffer.alloc(4);
    h[0] = 0x80 | opcode; h[1] = 126; h.writeUInt16BE(n, 2);
    return h;
  }
  const h = Buffer.alloc(10);
  h[0] = 0x80 | opcode; h[1] = 127; h.writeBigUInt64BE(BigInt(n), 2);
  return h;
}

// XOR with the 4-byte mask, a 32-bit word at a time (the buffer starts 4-byte aligned).
function unmask(payload, mask) {
  const n = payload.length;
  const words = n >>> 2;
  if (words) {
    const w = new Uint32Array(payload.buffer, payload.byteOffset, words);
    const m = mask.readUInt32LE(0);
    for (let i = 0; i < words; i++) w[i] ^= m;
  }
  for (let i = words << 2; i < n; i++) payload[i] ^= mask[i & 3];
}

server.on('upgrade', (req, socket, head) => {
  const key = req.headers['sec-websocket-key'];
  if (!key) { socket.destroy(); return; }
  const accept = crypto.createHash('sha1').update(key + GUID).digest('base64');
  socket.setNoDelay(true);
  socket.write(`HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ${accept}\r\n\r\n`);
  let chunks = head && head.length ? [head] : [];
  let buffered = chunks.length ? head.length : 0;
  const take = (n) => {
    // Remove n bytes from the front of the buffered chunks, as one Buffer.
    if (chunks[0].length >= n) {
      const out = chunks[0].subarray(0, n);
      if (chunks[0].length === n) chunks.shift(); else chunks[0] = chunks[0].subarray(n);
      buffered -= n;
      return out;
    }
    const out = Buffer.allocUnsafe(n);
    let off = 0;
    while (off < n) {
      const c = chunks[0];
      const k = Math.min(c.length, n - off);
      c.copy(out, off, 0, k);
      off += k;
      if (k === c.length) chunks.shift(); else chunks[0] = c.subarray(k);
    }
    buffered -= n;
    return out;
  };
  const peek = (n) => (chunks[0].length >= n ? chunks[0] : Buffer.concat(chunks, buffered));
  const pump = () => {
    while (buffered >= 2) {
      const h = peek(Math.min(buffered, 14));
      const opcode = h[0] & 0x0f;
      const masked = (h[1] & 0x80) !== 0;
      let n = h[1] & 0x7f;
      let off = 2;
      if (n === 126) { if (h.length < 4) return; n = h.readUInt16BE(2); off = 4; } else if (n === 127) { if (h.length < 10) return; n = Number(h.readBigUInt64BE(2)); off = 10; }
      const headLen = off + (masked ? 4 : 0);
      if (buffered < headLen + n) return;
      const headBuf = take(headLen);
      const payload = Buffer.allocUnsafeSlow(n); // own, 4-byte aligned copy: unmasked in place
      take(n).copy(payload);
      if (masked) unmask(payload, headBuf.subarray(off, off + 4));
      if (opcode === 0x8) { socket.end(Buffer.concat([frameHead(0x8, payload.length), payload])); return; }
      if (opcode === 0x9) { socket.write(Buffer.concat([frameHead(0xA, payload.length), payload])); continue; }
      socket.cork(); // one writev for head and payload
      socket.write(frameHead(opcode, n));
      socket.write(payload);
      socket.uncork();
    }
  };
  socket.on('data', (d) => { chunks.push(d); buffered += d.length; pump(); });
  socket.on('error', () => socket.destroy());
  socket.on('end', () => socket.end());
  pump();
});

const portArg = process.argv.indexOf('--port');
if (portArg > 0) {
  server.listen(Number(process.argv[portArg + 1]), '127.0.0.1', () => {
    console.log(`echo listening on 127.0.0.1:${server.address().port}`);
  });
} else {
  if (process.env.LISTEN_FDS !== '1') { console.error('no socket handed over (LISTEN_FDS=1, fd 3) and no --port given'); process.exit(2); }
  delete process.env.LISTEN_FDS;
  delete process.env.LISTEN_FDNAMES;
  delete process.env.LISTEN_PID;
  server.listen({ fd: 3 }, () => console.log('echo listening on fd 3'));
}
process.on('SIGTERM', () => process.exit(0));
