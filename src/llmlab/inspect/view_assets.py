"""The view page's CSS and JavaScript, written for llmlab (no library, nothing fetched): plain DOM, SVG and
canvas. The JavaScript reads the JSON in <script id="llmlab-data"> and draws five panels; window.LLMLAB
exposes the data and the state so tests (and curious users, in the console) can read them back."""

PAGE_CSS = """
body{font-family:system-ui,sans-serif;margin:0;color:#222;background:#fff}
#app{max-width:1200px;margin:0 auto;padding:1em}
h1{font-size:20px;margin:.2em 0}h2{font-size:17px;margin:1.2em 0 .4em;border-bottom:1px solid #ddd}
.note{color:#666;font-size:13px}.controls{margin:.4em 0;font-size:14px}.controls label{margin-right:.6em}
.tok{font:13px ui-monospace,monospace;cursor:pointer}.tok.dim{opacity:.35}
#mv{display:grid;gap:3px;overflow-x:auto}#mv canvas{width:56px;height:56px;border:1px solid #ccc;cursor:pointer;
image-rendering:pixelated}#mv canvas.sel{outline:2px solid #d33}.rowlab{font-size:11px;color:#666;align-self:center}
#big{border:1px solid #ccc;image-rendering:pixelated}
table.grid{border-collapse:collapse;font:12px ui-monospace,monospace}table.grid td,table.grid th{border:1px solid #ddd;
padding:2px 4px;text-align:center;white-space:nowrap}table.grid th{background:#f4f4f4;font-weight:normal}
.strip{display:inline-flex;vertical-align:middle}.strip span{display:inline-block;width:5px;height:14px}
.hbox{display:inline-block;width:12px;height:12px;margin-right:3px;vertical-align:middle}
#readout{font:12px ui-monospace,monospace;min-height:1.4em}
"""

PAGE_JS = r"""
(function () {
  'use strict';
  var D = JSON.parse(document.getElementById('llmlab-data').textContent);
  var S = {kind: 'self', layer: 0, heads: null, focus: null, big: [0, 0], qkLayer: 0, qkHead: 0, qkQuery: 0};
  window.LLMLAB = {data: D, state: S};
  var app = document.getElementById('app');

  function el(tag, attrs, text) {
    var e = document.createElement(tag);
    for (var k in (attrs || {})) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function svgEl(tag, attrs) {
    var e = document.createElementNS('http://www.w3.org/2000/svg', tag);
    for (var k in attrs) e.setAttribute(k, attrs[k]);
    return e;
  }
  function headColor(h, n) { return 'hsl(' + Math.round(h * 360 / n) + ',70%,42%)'; }
  function heat(v) {  // 0..1 -> white..dark blue
    var c = Math.round(255 * (1 - Math.max(0, Math.min(1, v))));
    return 'rgb(' + c + ',' + c + ',255)';
  }
  function diverge(v) {  // -1..1 -> red..white..blue
    v = Math.max(-1, Math.min(1, v));
    var c = Math.round(255 * (1 - Math.abs(v)));
    return v >= 0 ? 'rgb(' + c + ',' + c + ',255)' : 'rgb(255,' + c + ',' + c + ')';
  }
  function W() { return S.kind === 'cross' ? D.cross_weights : D.weights; }
  function qTokens() { return S.kind === 'cross' ? D.target_tokens : D.tokens; }
  function select(options, value, onchange, id) {
    var s = el('select', id ? {id: id} : {});
    options.forEach(function (o) {
      var opt = el('option', {value: o[0]}, o[1]);
      if (String(o[0]) === String(value)) opt.selected = true;
      s.appendChild(opt);
    });
    s.addEventListener('change', function () { onchange(s.value); });
    return s;
  }

  // ------------------------------------------------------------------ header
  app.appendChild(el('h1', {}, 'llmlab view' + (D.model ? ': ' + D.model : '')));
  app.appendChild(el('p', {class: 'note'}, D.arch + ' model, ' + D.n_layers + ' layers x ' + D.n_heads +
    ' heads, ' + D.tokens.length + ' tokens. Text: ' + D.text));

  // ------------------------------------------------------------------ head view
  app.appendChild(el('h2', {}, 'Head view'));
  app.appendChild(el('p', {class: 'note'}, 'Queries on the left, keys on the right; a line\'s opacity is the ' +
    'attention weight. Hover a query token to show only its lines; pick the layer and the heads.'));
  var hvControls = el('div', {class: 'controls', id: 'hv-controls'});
  app.appendChild(hvControls);
  var selected = el('div', {id: 'selected', class: 'note'});
  app.appendChild(selected);
  var hv = svgEl('svg', {id: 'hv'});
  app.appendChild(hv);

  function nLayers() { return W().length; }
  function drawHvControls() {
    hvControls.innerHTML = '';
    if (D.cross_weights) {
      hvControls.appendChild(el('label', {}, 'attention '));
      hvControls.appendChild(select([['self', 'self (encoder)'], ['cross', 'cross (decoder -> encoder)']], S.kind,
        function (v) { S.kind = v; S.layer = 0; S.heads = null; S.big = [0, 0]; drawAll(); }, 'kind'));
    }
    hvControls.appendChild(el('label', {}, ' layer '));
    var opts = [];
    for (var l = 0; l < nLayers(); l++) opts.push([l, String(l)]);
    hvControls.appendChild(select(opts, S.layer, function (v) { S.layer = +v; drawHead(); drawModel(); }, 'layer'));
    hvControls.appendChild(el('label', {}, ' heads '));
    var H = W()[0].length;
    for (var h = 0; h < H; h++) {
      (function (h) {
        var box = el('input', {type: 'checkbox', id: 'head-' + h, 'data-h': h});
        box.checked = S.heads === null || S.heads.indexOf(h) >= 0;
        box.addEventListener('change', function () {
          var on = [];
          for (var i = 0; i < H; i++) if (document.getElementById('head-' + i).checked) on.push(i);
          S.heads = on; drawHead();
        });
        var lab = el('label', {});
        var sw = el('span', {class: 'hbox'}); sw.style.background = headColor(h, H);
        lab.appendChild(box); lab.appendChild(sw); lab.appendChild(document.createTextNode(String(h)));
        hvControls.appendChild(lab);
      })(h);
    }
  }

  function drawHead() {
    var w = W()[S.layer], H = w.length, qt = qTokens(), kt = D.tokens;
    var heads = S.heads === null ? Array.apply(null, Array(H)).map(function (_, i) { return i; }) : S.heads;
    selected.textContent = 'layer ' + S.layer + ', heads ' + heads.join(',');
    while (hv.firstChild) hv.removeChild(hv.firstChild);
    var rowH = 18, n = Math.max(qt.length, kt.length), xl = 150, xr = 450;
    hv.setAttribute('width', 600); hv.setAttribute('height', n * rowH + 10);
    var g = svgEl('g', {id: 'hv-lines'});
    hv.appendChild(g);
    heads.forEach(function (h) {
      for (var q = 0; q < qt.length; q++) {
        if (S.focus !== null && S.focus !== q) continue;
        for (var k = 0; k < kt.length; k++) {
          var v = w[h][q][k];
          if (v < 0.01) continue;
          g.appendChild(svgEl('line', {x1: xl + 5, y1: q * rowH + 14, x2: xr - 5, y2: k * rowH + 14,
            stroke: headColor(h, H), 'stroke-width': 2, 'stroke-opacity': Math.min(1, v),
            'data-l': S.layer, 'data-h': h, 'data-q': q, 'data-k': k, 'data-w': String(v)}));
        }
      }
    });
    qt.forEach(function (t, i) {
      var e = svgEl('text', {x: xl, y: i * rowH + 18, 'text-anchor': 'end', class: 'tok qtok' +
        (S.focus !== null && S.focus !== i ? ' dim' : ''), 'data-q': i});
      e.textContent = t;
      e.addEventListener('mouseenter', function () { S.focus = i; drawHead(); });
      e.addEventListener('mouseleave', function () { S.focus = null; drawHead(); });
      hv.appendChild(e);
    });
    kt.forEach(function (t, i) {
      var e = svgEl('text', {x: xr, y: i * rowH + 18, class: 'tok ktok'});
      e.textContent = t;
      hv.appendChild(e);
    });
  }

  // ------------------------------------------------------------------ model view
  app.appendChild(el('h2', {}, 'Model view'));
  app.appendChild(el('p', {class: 'note'}, 'Every layer (rows) and head (columns); darker = more attention ' +
    '(query down, key across). Click a thumbnail to enlarge it and to show that head in the head view.'));
  var mv = el('div', {id: 'mv'});
  app.appendChild(mv);
  var bigTitle = el('div', {id: 'big-title', class: 'note'});
  app.appendChild(bigTitle);
  var big = el('canvas', {id: 'big'});
  app.appendChild(big);
  var readout = el('div', {id: 'readout'});
  app.appendChild(readout);

  function paint(canvas, m) {
    var rows = m.length, cols = m[0].length;
    canvas.width = cols; canvas.height = rows;
    var ctx = canvas.getContext('2d'), img = ctx.createImageData(cols, rows);
    for (var i = 0; i < rows; i++) for (var j = 0; j < cols; j++) {
      var c = Math.round(255 * (1 - Math.min(1, m[i][j]))), p = 4 * (i * cols + j);
      img.data[p] = c; img.data[p + 1] = c; img.data[p + 2] = 255; img.data[p + 3] = 255;
    }
    ctx.putImageData(img, 0, 0);
  }
  function drawModel() {
    mv.innerHTML = '';
    var w = W(), H = w[0].length;
    mv.style.gridTemplateColumns = '28px repeat(' + H + ', 60px)';
    mv.appendChild(el('span'));
    for (var h = 0; h < H; h++) mv.appendChild(el('span', {class: 'rowlab'}, 'H' + h));
    for (var l = 0; l < w.length; l++) {
      mv.appendChild(el('span', {class: 'rowlab'}, 'L' + l));
      for (h = 0; h < H; h++) {
        var c = el('canvas', {class: 'thumb', id: 'thumb-' + l + '-' + h, 'data-l': l, 'data-h': h,
          title: 'layer ' + l + ', head ' + h});
        if (l === S.big[0] && h === S.big[1]) c.classList.add('sel');
        paint(c, w[l][h]);
        c.addEventListener('click', function (ev) {
          var t = ev.currentTarget, l2 = +t.getAttribute('data-l'), h2 = +t.getAttribute('data-h');
          S.big = [l2, h2]; S.layer = l2; S.heads = [h2];
          drawHvControls(); drawHead(); drawModel(); drawBig();
        });
        mv.appendChild(c);
      }
    }
  }
  function drawBig() {
    var m = W()[S.big[0]][S.big[1]], qt = qTokens(), kt = D.tokens;
    bigTitle.textContent = 'layer ' + S.big[0] + ', head ' + S.big[1] + ' (hover a cell for its value)';
    paint(big, m);
    var scale = Math.max(4, Math.floor(400 / Math.max(m.length, m[0].length)));
    big.style.width = (m[0].length * scale) + 'px'; big.style.height = (m.length * scale) + 'px';
    big.onmousemove = function (ev) {
      var r = big.getBoundingClientRect();
      var j = Math.floor((ev.clientX - r.left) / scale), i = Math.floor((ev.clientY - r.top) / scale);
      if (i >= 0 && i < m.length && j >= 0 && j < m[0].length)
        readout.textContent = 'query ' + i + ' ' + JSON.stringify(qt[i]) + ' -> key ' + j + ' ' +
          JSON.stringify(kt[j]) + ': ' + m[i][j];
    };
  }

  // ------------------------------------------------------------------ query / key view
  app.appendChild(el('h2', {}, 'Query / key view'));
  app.appendChild(el('p', {class: 'note'}, 'score(q, k_j) = sum_d q_d k_j,d / sqrt(d_k); w_j = exp(score_j) / ' +
    'sum_i exp(score_i) over the keys the query may see. Each strip shows the d_k products q_d k_j,d / sqrt(d_k) ' +
    '(blue positive, red negative); their sum is the score, the softmax of the scores is the weight.'));
  var qkControls = el('div', {class: 'controls', id: 'qk-controls'});
  app.appendChild(qkControls);
  var qkTable = el('div', {id: 'qk'});
  app.appendChild(qkTable);

  function drawQk() {
    qkControls.innerHTML = ''; qkTable.innerHTML = '';
    var Q = D.qk;
    if (!Q || !Q.layers.length) { qkTable.textContent = 'no query/key data'; return; }
    var li = Q.layers.indexOf(S.qkLayer); if (li < 0) { li = 0; S.qkLayer = Q.layers[0]; }
    qkControls.appendChild(el('label', {}, 'layer '));
    qkControls.appendChild(select(Q.layers.map(function (l) { return [l, String(l)]; }), S.qkLayer,
      function (v) { S.qkLayer = +v; drawQk(); }, 'qk-layer'));
    qkControls.appendChild(el('label', {}, ' head '));
    var hopts = []; for (var h = 0; h < D.n_heads; h++) hopts.push([h, String(h)]);
    qkControls.appendChild(select(hopts, S.qkHead, function (v) { S.qkHead = +v; drawQk(); }, 'qk-head'));
    qkControls.appendChild(el('label', {}, ' query token '));
    qkControls.appendChild(select(D.tokens.map(function (t, i) { return [i, i + ': ' + t]; }), S.qkQuery,
      function (v) { S.qkQuery = +v; drawQk(); }, 'qk-query'));
    if (Q.layers.length < D.n_layers)
      qkControls.appendChild(el('span', {class: 'note'}, ' (q/k vectors inlined for layers ' + Q.layers.join(',') +
        ' only, to keep the page small)'));
    var q = Q.q[li][S.qkHead][S.qkQuery], ks = Q.k[li][S.qkHead], d = Q.head_dim, sq = Math.sqrt(d);
    var scores = [], prods = [];
    for (var j = 0; j < ks.length; j++) {
      var p = [], s = 0;
      for (var c = 0; c < d; c++) { var v = q[c] * ks[j][c] / sq; p.push(v); s += v; }
      prods.push(p); scores.push(Q.causal && j > S.qkQuery ? -Infinity : s);
    }
    var mx = Math.max.apply(null, scores), z = 0;
    var ex = scores.map(function (s) { var e = Math.exp(s - mx); z += e; return e; });
    var maxAbs = 1e-9;
    prods.forEach(function (p) { p.forEach(function (v) { maxAbs = Math.max(maxAbs, Math.abs(v)); }); });
    var t = el('table', {class: 'grid', id: 'qk-table'});
    var hr = el('tr'); ['key', 'q_d k_d / sqrt(d_k), d = 0..' + (d - 1), 'score', 'softmax', 'model weight'].forEach(
      function (x) { hr.appendChild(el('th', {}, x)); });
    t.appendChild(hr);
    var model = D.weights[S.qkLayer][S.qkHead][S.qkQuery];
    for (j = 0; j < ks.length; j++) {
      var tr = el('tr', {'data-k': j});
      tr.appendChild(el('td', {}, j + ': ' + D.tokens[j]));
      var td = el('td'), strip = el('span', {class: 'strip'});
      prods[j].forEach(function (v, c) {
        var sp = el('span', {title: 'd=' + c + ': ' + v.toFixed(4)}); sp.style.background = diverge(v / maxAbs);
        strip.appendChild(sp);
      });
      td.appendChild(strip); tr.appendChild(td);
      var masked = scores[j] === -Infinity;
      tr.appendChild(el('td', {class: 'score'}, masked ? 'masked' : scores[j].toFixed(3)));
      tr.appendChild(el('td', {class: 'soft'}, (ex[j] / z).toFixed(4)));
      tr.appendChild(el('td', {class: 'mw'}, model[j].toFixed(4)));
      t.appendChild(tr);
    }
    qkTable.appendChild(t);
  }

  // ------------------------------------------------------------------ logit lens
  app.appendChild(el('h2', {}, 'Logit lens'));
  app.appendChild(el('p', {class: 'note'}, 'The top next-token prediction read off the residual stream before ' +
    'the first layer and after each layer (final norm and unembedding applied early); darker = more probable. ' +
    'Hover a cell for the top 5.'));
  var lens = el('div', {id: 'lens'});
  app.appendChild(lens);
  function drawLens() {
    lens.innerHTML = '';
    if (!D.lens) { lens.appendChild(el('p', {class: 'note'}, 'not shown: ' + D.lens_note)); return; }
    var t = el('table', {class: 'grid', id: 'lens-table'}), hr = el('tr');
    hr.appendChild(el('th', {}, 'layer \\ token'));
    D.tokens.forEach(function (tk) { hr.appendChild(el('th', {}, tk)); });
    t.appendChild(hr);
    D.lens.top.forEach(function (row, l) {
      var tr = el('tr'); tr.appendChild(el('th', {}, D.lens.layers[l]));
      row.forEach(function (top) {
        var td = el('td', {title: top.map(function (x) { return JSON.stringify(x[0]) + ' ' + x[1]; }).join('\n')},
          top[0][0]);
        td.style.background = heat(top[0][1]);
        if (top[0][1] > 0.6) td.style.color = '#fff';
        tr.appendChild(td);
      });
      t.appendChild(tr);
    });
    lens.appendChild(t);
  }

  // ------------------------------------------------------------------ activation patching
  app.appendChild(el('h2', {}, 'Activation patching'));
  var patch = el('div', {id: 'patch'});
  app.appendChild(patch);
  function drawPatch() {
    patch.innerHTML = '';
    var P = D.patch;
    if (!P) {
      patch.appendChild(el('p', {class: 'note'}, 'not computed: give a corrupted prompt with --patch'));
      return;
    }
    patch.appendChild(el('p', {class: 'note'}, 'Clean: ' + P.clean + ' | corrupted: ' + P.corrupted + '. The ' +
      'corrupted run with the residual stream after layer l at position p taken from the clean run; cell = ' +
      '(m(patched) - m(corrupted)) / (m(clean) - m(corrupted)), m = ' + P.metric + ' (1 = clean behaviour restored).'));
    var t = el('table', {class: 'grid', id: 'patch-table'}), hr = el('tr');
    hr.appendChild(el('th', {}, 'layer \\ position'));
    P.clean_tokens.forEach(function (tk, i) {
      hr.appendChild(el('th', {}, tk === P.corrupted_tokens[i] ? tk : tk + ' / ' + P.corrupted_tokens[i]));
    });
    t.appendChild(hr);
    P.effects.forEach(function (row, l) {
      var tr = el('tr'); tr.appendChild(el('th', {}, String(l)));
      row.forEach(function (v) {
        var td = el('td', {title: String(v)}, v.toFixed(2)); td.style.background = diverge(v); tr.appendChild(td);
      });
      t.appendChild(tr);
    });
    patch.appendChild(t);
  }

  function drawAll() { drawHvControls(); drawHead(); drawModel(); drawBig(); drawQk(); drawLens(); drawPatch(); }
  S.qkQuery = D.tokens.length - 1;
  drawAll();
  document.body.setAttribute('data-ready', '1');
})();
"""
