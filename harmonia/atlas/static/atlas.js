// Harmonia atlas: the few interactions of the static site (search, random class, map hover, crops).
// No framework and no fetch(): the data a page needs is in the page, so the site works from file://.
(function () {
  "use strict";
  var root = document.body.getAttribute("data-root") || "";

  function classList() {
    var node = document.getElementById("atlas-classes");
    if (!node) { return []; }
    try { return JSON.parse(node.textContent); } catch (e) { return []; }
  }

  // Random class: every "random class" link jumps to a class page drawn at random.
  var classes = classList();
  document.querySelectorAll("a.random-class").forEach(function (link) {
    link.addEventListener("click", function (event) {
      if (!classes.length) { return; }
      event.preventDefault();
      var pick = classes[Math.floor(Math.random() * classes.length)];
      window.location.href = root + pick.page;
    });
  });

  // Search: keep the class cards whose name contains the query, or whose id is the query.
  var search = document.getElementById("class-search");
  if (search) {
    var cards = Array.prototype.slice.call(document.querySelectorAll(".class-card"));
    var count = document.getElementById("class-count");
    var none = document.getElementById("no-match");
    var filter = function () {
      var query = search.value.trim().toLowerCase().replace(/^#/, "");
      var shown = 0;
      cards.forEach(function (card) {
        var hit = !query || card.getAttribute("data-name").indexOf(query) !== -1 || card.getAttribute("data-id") === query;
        card.hidden = !hit;
        if (hit) { shown += 1; }
      });
      if (count) { count.textContent = query ? shown + " of " + cards.length + " classes" : cards.length + " classes"; }
      if (none) { none.hidden = shown !== 0; }
    };
    search.addEventListener("input", filter);
    search.addEventListener("keydown", function (event) {  // Enter opens the only match
      if (event.key !== "Enter") { return; }
      var visible = cards.filter(function (card) { return !card.hidden; });
      if (visible.length === 1) { window.location.href = visible[0].getAttribute("href"); }
    });
    filter();
  }

  // Concept pictures open their crops (the <details> below works without JS too).
  document.querySelectorAll(".concept").forEach(function (card) {
    var picture = card.querySelector(".concept-picture");
    var crops = card.querySelector("details.crops");
    if (picture && crops) {
      picture.addEventListener("click", function () { crops.open = !crops.open; });
    }
  });

  // Map: hovering (or focusing) a dot shows its image beside it.
  var tip = document.getElementById("map-tip");
  if (tip) {
    var tipImage = tip.querySelector("img");
    var tipText = tip.querySelector(".map-tip-text");
    var wrap = tip.parentNode;
    var show = function (event) {
      var dot = event.currentTarget;
      tipImage.src = dot.getAttribute("data-src");
      tipText.textContent = dot.getAttribute("data-tip");
      var box = dot.getBoundingClientRect();
      var frame = wrap.getBoundingClientRect();
      tip.style.left = (box.right - frame.left + 8) + "px";
      tip.style.top = (box.top - frame.top - 8) + "px";
      tip.hidden = false;
    };
    var hide = function () { tip.hidden = true; };
    document.querySelectorAll(".map-point").forEach(function (dot) {
      dot.addEventListener("mouseenter", show);
      dot.addEventListener("focus", show);
      dot.addEventListener("mouseleave", hide);
      dot.addEventListener("blur", hide);
    });
  }
}());
