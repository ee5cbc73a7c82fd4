// The TollGate portal: price list from the advertisement (GET /), payment (POST /), live
// remaining allowance (GET /captive), Lightning checkout (POST /ln-invoice, then GET
// /ln-invoice?quote= every 2 s; the QR code is an SVG image from /ln-invoice/qr.svg).
// Everything received goes into the DOM as textContent.
'use strict';
(function () {
  const $ = (id) => document.getElementById(id);

  function tag(ev, name) {
    const t = (Array.isArray(ev && ev.tags) ? ev.tags : []).find(
      (t) => Array.isArray(t) && t[0] === name);
    return t ? String(t[1]) : undefined;
  }

  function say(el, text, cls) {
    el.textContent = text;
    el.className = cls || '';
  }

  function bytes(n) {
    const units = ['bytes', 'KB', 'MB', 'GB', 'TB'];
    let v = Number(n);
    let i = 0;
    while (v >= 1000 && i < units.length - 1) { v /= 1000; i += 1; }
    return i === 0 ? v + ' bytes' : v.toFixed(1) + ' ' + units[i];
  }

  function duration(ms) {
    const s = Math.floor(Number(ms) / 1000);
    const h = Math.floor(s / 3600);
    const m = Math.floor((s % 3600) / 60);
    return (h ? h + ' h ' : '') + (h || m ? m + ' min ' : '') + (s % 60) + ' s';
  }

  function stepText(metric, step) {
    if (metric === 'bytes') return bytes(step);
    if (metric === 'milliseconds') return duration(step);
    return step + ' ' + metric;
  }

  async function loadPrices() {
    const ul = $('prices');
    try {
      const r = await fetch('/', { cache: 'no-store' });
      if (!r.ok) throw new Error('HTTP ' + r.status);
      const ev = await r.json();
      const metric = tag(ev, 'metric') || '?';
      const step = tag(ev, 'step_size') || '?';
      const items = [];
      const mints = [];
      for (const t of ev.tags || []) {
        if (!Array.isArray(t) || t[0] !== 'price_per_step') continue;
        if (t[1] === 'cashu') {
          const opt = document.createElement('option');
          opt.value = String(t[4]);
          opt.textContent = String(t[4]);
          opt.dataset.min = String(Number(t[2]) * Math.max(1, Number(t[5] || 1)));
          mints.push(opt);
        }
        const li = document.createElement('li');
        li.className = 'price';
        li.textContent = String(t[2]) + ' ' + String(t[3]) + ' per ' + stepText(metric, step) +
          ' (at least ' + String(t[5] || 0) + ' steps), mint ' + String(t[4]);
        items.push(li);
      }
      if (items.length === 0) {
        const li = document.createElement('li');
        li.textContent = 'No prices advertised.';
        items.push(li);
      }
      ul.replaceChildren(...items);
      $('ln-mint').replaceChildren(...mints);
      lnMintChanged();
    } catch (e) {
      const li = document.createElement('li');
      li.className = 'error';
      li.textContent = 'Price list unavailable: ' + e.message;
      ul.replaceChildren(li);
    }
  }

  async function refresh() {
    try {
      const r = await fetch('/captive', { cache: 'no-store' });
      const c = await r.json();
      if (c.captive) {
        say($('status'), 'Not connected yet: pay below to get online.');
        say($('remaining'), '');
      } else {
        say($('status'), 'Connected.', 'ok');
        if (c['bytes-remaining'] !== undefined) {
          const n = Number(c['bytes-remaining']);
          say($('remaining'), n + ' bytes remaining (' + bytes(n) + ')');
        } else if (c['seconds-remaining'] !== undefined) {
          say($('remaining'), duration(Number(c['seconds-remaining']) * 1000) + ' remaining');
        }
      }
    } catch (e) {
      say($('status'), 'Cannot reach the gateway: ' + e.message, 'error');
    }
  }

  async function pay() {
    const button = $('pay');
    const result = $('result');
    const token = $('token').value.trim();
    if (!token) { say(result, 'Paste a Cashu token first.', 'error'); return; }
    button.disabled = true;
    say(result, 'Paying…');
    try {
      const r = await fetch('/', {
        method: 'POST', headers: { 'Content-Type': 'text/plain' }, body: token,
      });
      const text = await r.text();
      let ev = null;
      try { ev = JSON.parse(text); } catch (_) { ev = null; }
      if (r.ok && ev && ev.kind === 1022) {
        const metric = tag(ev, 'metric');
        const allot = tag(ev, 'allotment');
        say(result, 'Paid. Allotment: ' + (metric === 'bytes' ? bytes(allot) : stepText(metric, allot)), 'ok');
        $('token').value = '';
      } else if (ev && ev.kind === 21023) {
        say(result, 'Payment refused: ' + String(ev.content || '') + ' (' + (tag(ev, 'code') || 'error') + ')', 'error');
      } else {
        say(result, 'Payment failed: HTTP ' + r.status, 'error');
      }
    } catch (e) {
      say(result, 'Network error: ' + e.message, 'error');
    } finally {
      button.disabled = false;
      refresh();
    }
  }

  // ---------------------------------------------------------------- Lightning
  let lnTimer = null;

  function showTab(ln) {
    $('pane-ln').hidden = !ln;
    $('pane-ecash').hidden = ln;
    $('tab-ln').setAttribute('aria-selected', String(ln));
    $('tab-ecash').setAttribute('aria-selected', String(!ln));
  }

  function lnMintChanged() {
    const opt = $('ln-mint').selectedOptions[0];
    if (opt && !$('ln-amount').value) $('ln-amount').value = opt.dataset.min;
  }

  function lnStop() {
    if (lnTimer) clearInterval(lnTimer);
    lnTimer = null;
  }

  async function lnPoll(quote) {
    try {
      const r = await fetch('/ln-invoice?quote=' + encodeURIComponent(quote), { cache: 'no-store' });
      const p = await r.json();
      if (!r.ok || !p.status) {
        say($('ln-state'), 'Invoice status unavailable: ' + String(p.error || r.status), 'error');
        return;
      }
      if (p.access_granted) {
        lnStop();
        const allot = p.metric === 'bytes' ? bytes(p.allotment) : stepText(p.metric, p.allotment);
        say($('ln-state'), 'Paid: access granted (' + allot + ').', 'ok');
        $('ln-qr').hidden = true;
        refresh();
      } else if (p.state === 'EXPIRED') {
        lnStop();
        say($('ln-state'), 'The invoice expired unpaid. Get a new one.', 'error');
        $('ln-qr').hidden = true;
      } else if (p.state === 'PAID' || p.state === 'ISSUED') {
        say($('ln-state'), 'Payment received, opening the gate…');
      } else {
        say($('ln-state'), 'Waiting for payment…');
      }
    } catch (e) {
      say($('ln-state'), 'Cannot reach the gateway: ' + e.message, 'error');
    }
  }

  async function lnInvoice() {
    const button = $('ln-get');
    lnStop();
    button.disabled = true;
    say($('ln-state'), 'Asking the mint for an invoice…');
    try {
      const r = await fetch('/ln-invoice', {
        method: 'POST', headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify({ amount: Number($('ln-amount').value), mint_url: $('ln-mint').value }),
      });
      const p = await r.json();
      if (!r.ok || !p.status) {
        say($('ln-state'), 'No invoice: ' + String(p.error || ('HTTP ' + r.status)), 'error');
        return;
      }
      $('ln-invoice').value = String(p.invoice);
      $('ln-invoice').hidden = false;
      $('ln-qr').src = '/ln-invoice/qr.svg?quote=' + encodeURIComponent(p.quote);
      $('ln-qr').hidden = false;
      say($('ln-state'), 'Waiting for payment…');
      lnTimer = setInterval(() => lnPoll(p.quote), 2000);
    } catch (e) {
      say($('ln-state'), 'Network error: ' + e.message, 'error');
    } finally {
      button.disabled = false;
    }
  }

  $('tab-ecash').addEventListener('click', () => showTab(false));
  $('tab-ln').addEventListener('click', () => showTab(true));
  $('ln-mint').addEventListener('change', () => { $('ln-amount').value = ''; lnMintChanged(); });
  $('ln-get').addEventListener('click', lnInvoice);
  $('pay').addEventListener('click', pay);
  loadPrices();
  refresh();
  setInterval(refresh, 2000);
}());
