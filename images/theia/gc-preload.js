// gc-preload.js - on SIGUSR2, collect garbage and hand freed memory back to the kernel; report on stderr.
//
//   node --expose-gc --require /opt/theia/gc-preload.js /opt/theia/lib/backend/main.js ...
//   kill -USR2 <backend pid>
//
// On SIGUSR2 the process
//
// 1. runs a full, synchronous garbage collection (`global.gc()`, exposed by --expose-gc): frees
//    JavaScript objects; V8 returns the emptied pages of its own heap;
// 2. calls glibc's malloc_trim(0) through malloc-trim.node (next to this file; built from
//    malloc-trim.c by images/theia/build): returns the free pages of the C heap. An idle Theia
//    backend keeps ~40 MiB of freed C heap that glibc never returns by itself, far more than the
//    GC frees; the process keeps running and faults pages back in when it needs them;
//
// and writes one JSON line to stderr, e.g.
//
//   {"wsup":"gc","pid":123,"ok":true,"ms":19.3,"heap_used_before":32481336,"heap_used_after":31609512,
//    "heap_total_before":35078144,"heap_total_after":34029568,"external_before":4668636,
//    "external_after":4668676,"rss_before":134098944,"rss_after_gc":134098944,"trimmed":true,
//    "trim_ms":2.1,"rss_after":89329664}
//
// (bytes; the line always starts with `{"wsup":"gc"`). The idle ladder of workspace-supervisor
// sends the signal and parses the line. SIGUSR1 is deliberately not used: Node reserves it for
// the inspector. Without --expose-gc the handler still swallows SIGUSR2 (whose default action
// would kill the IDE) and reports {"wsup":"gc","ok":false,"error":...} (the trim still runs);
// without the addon, "trimmed" is false and "trim_error" says why.
'use strict';

const path = require('path');

let trimAddon = null;
let trimLoadError = null;
const loadTrim = () => {
    if (trimAddon === null && trimLoadError === null) {
        try {
            trimAddon = require(path.join(__dirname, 'malloc-trim.node'));
        } catch (err) {
            trimLoadError = String(err && err.message ? err.message : err).split('\n')[0];
        }
    }
    return trimAddon;
};

process.on('SIGUSR2', () => {
    const report = { wsup: 'gc', pid: process.pid };
    try {
        const before = process.memoryUsage();
        report.rss_before = before.rss;
        if (typeof global.gc !== 'function') {
            report.ok = false;
            report.error = 'global.gc is not available: start node with --expose-gc';
        } else {
            const t0 = process.hrtime.bigint();
            global.gc();
            const ms = Number(process.hrtime.bigint() - t0) / 1e6;
            const after = process.memoryUsage();
            report.ok = true;
            report.ms = Math.round(ms * 10) / 10;
            report.heap_used_before = before.heapUsed;
            report.heap_used_after = after.heapUsed;
            report.heap_total_before = before.heapTotal;
            report.heap_total_after = after.heapTotal;
            report.external_before = before.external;
            report.external_after = after.external;
            report.rss_after_gc = after.rss;
        }
        const addon = loadTrim();
        if (addon === null) {
            report.trimmed = false;
            report.trim_error = trimLoadError;
        } else {
            const t1 = process.hrtime.bigint();
            report.trimmed = addon.trim() === true;
            report.trim_ms = Math.round(Number(process.hrtime.bigint() - t1) / 1e5) / 10;
        }
        report.rss_after = process.memoryUsage.rss();
    } catch (err) {
        report.ok = false;
        report.error = String(err && err.message ? err.message : err);
    }
    try {
        process.stderr.write(JSON.stringify(report) + '\n');
    } catch (_) {
        // stderr gone: nothing useful to do
    }
});
