#include "model/model.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>

#include "cpu/ops.h"
#include "cpu/panels.h"
#include "ops/matmul.h"

namespace pe {

namespace {

class Loader {
 public:
  explicit Loader(const GGUFFile& f) : f_(f) {}

  const GGUFTensorInfo* find(const std::string& name, bool required) const {
    const GGUFTensorInfo* t = f_.find_tensor(name);
    PE_CHECK(t || !required, ModelFormatError, f_.path(), ": missing tensor '", name, "'");
    return t;
  }

  // A [rows x cols] weight matrix (ggml shape ne = {cols, rows}), used in place in the mapping.
  Tensor matrix(const std::string& name, int64_t rows, int64_t cols, bool required = true) const {
    const GGUFTensorInfo* t = find(name, required);
    if (!t) return Tensor{};
    const int64_t r = t->ne.size() > 1 ? t->ne[1] : 1;
    bool extra = false;
    for (size_t d = 2; d < t->ne.size(); d++) extra |= t->ne[d] != 1;
    PE_CHECK(t->ne[0] == cols && r == rows && !extra, ModelFormatError, f_.path(), ": tensor '", name,
             "' has shape ", shape(*t), ", expected [", cols, ", ", rows, "] from the hyper-parameters");
    PE_CHECK(matmul_supports(GGMLType(t->type)), UnsupportedModelError, f_.path(), ": tensor '", name, "' has type ",
             type_name(t->type), ", which this engine cannot multiply yet");
    return Tensor{GGMLType(t->type), const_cast<uint8_t*>(t->data), rows, cols, row_bytes(GGMLType(t->type), cols)};
  }

  Linear linear(Model& m, const std::string& base, int64_t rows, int64_t cols, bool required = true) const;

  // Experts stacked in a 3-D tensor (ggml shape {cols, rows, n_expert}), viewed as [n_expert * rows x cols].
  Tensor experts(const std::string& name, int64_t n_expert, int64_t rows, int64_t cols, const char* dims) const {
    const GGUFTensorInfo* t = find(name, true);
    PE_CHECK(t->ne.size() == 3 && t->ne[0] == cols && t->ne[1] == rows && t->ne[2] == n_expert, ModelFormatError,
             f_.path(), ": tensor '", name, "' has shape ", shape(*t), ", expected [", cols, ", ", rows, ", ", n_expert,
             "] (", dims, ", expert_count)");
    PE_CHECK(matmul_supports(GGMLType(t->type)), UnsupportedModelError, f_.path(), ": tensor '", name, "' has type ",
             type_name(t->type), ", which this engine cannot multiply yet");
    return Tensor{GGMLType(t->type), const_cast<uint8_t*>(t->data), n_expert * rows, cols,
                  row_bytes(GGMLType(t->type), cols)};
  }

  // A 1-D float tensor of n elements, converted to F32.
  Vec vec(const std::string& name, int64_t n, bool required = true) const {
    const GGUFTensorInfo* t = find(name, required);
    if (!t) return {};
    PE_CHECK(t->nelements() == n && t->ne[0] == n, ModelFormatError, f_.path(), ": tensor '", name, "' has shape ",
             shape(*t), ", expected [", n, "]");
    return floats(*t, name, "1-D");
  }

  // A [rows x cols] float tensor (ggml shape {cols, rows}), converted to F32 row-major.
  Vec float_matrix(const std::string& name, int64_t rows, int64_t cols) const {
    const GGUFTensorInfo* t = find(name, true);
    PE_CHECK(t->ne.size() >= 2 && t->ne[0] == cols && t->ne[1] == rows && t->nelements() == rows * cols,
             ModelFormatError, f_.path(), ": tensor '", name, "' has shape ", shape(*t), ", expected [", cols, ", ",
             rows, "] from the hyper-parameters");
    return floats(*t, name, "float");
  }

 private:
  Vec floats(const GGUFTensorInfo& t, const std::string& name, const char* what) const {
    const int64_t n = t.nelements();
    Vec out(static_cast<size_t>(n));
    switch (GGMLType(t.type)) {
      case GGMLType::F32: std::memcpy(out.data(), t.data, size_t(n) * 4); break;
      case GGMLType::F16:
        for (int64_t i = 0; i < n; i++) out[i] = fp16_to_fp32(reinterpret_cast<const fp16_t*>(t.data)[i]);
        break;
      case GGMLType::BF16:
        for (int64_t i = 0; i < n; i++) out[i] = bf16_to_fp32(reinterpret_cast<const bf16_t*>(t.data)[i]);
        break;
      default:
        PE_THROW(UnsupportedModelError, f_.path(), ": ", what, " tensor '", name, "' has type ", type_name(t.type),
                 " (F32, F16 or BF16 expected)");
    }
    return out;
  }
  static std::string shape(const GGUFTensorInfo& t) {
    std::string s = "[";
    for (size_t d = 0; d < t.ne.size(); d++) s += (d ? ", " : "") + std::to_string(t.ne[d]);
    return s + "]";
  }
  const GGUFFile& f_;
};

}  // namespace

Tensor Model::keep(Vec v, int64_t rows) {
  if (v.empty()) return Tensor{};
  vecs_.push_back(std::move(v));
  const int64_t cols = int64_t(vecs_.back().size()) / rows;
  return f32_tensor(vecs_.back().data(), rows, cols, cols);
}

std::vector<Tensor*> Layer::tensors() {
  return {&attn_norm, &attn_norm_b, &wqkv.w, &wqkv.b, &wq.w, &wq.b, &wk.w, &wk.b, &wv.w, &wv.b, &wo.w, &wo.b,
          &attn_q_norm, &attn_k_norm, &attn_post_norm, &ffn_post_norm, &ffn_norm, &ffn_norm_b, &w_gate.w, &w_gate.b, &w_up.w, &w_up.b, &w_down.w, &w_down.b,
          &experts.router, &experts.gate, &experts.up, &experts.down, &prefix_k, &prefix_v,
          &cross_norm, &cross_norm_b, &cross_q.w, &cross_q.b, &cross_k.w, &cross_k.b, &cross_v.w, &cross_v.b, &cross_o.w, &cross_o.b};
}

std::vector<Tensor*> Head::tensors() { return {&output_norm, &output_norm_b, &output.w, &output.b}; }

namespace {

size_t tensor_bytes(const Tensor& t) { return t.empty() ? 0 : t.row_stride * size_t(t.rows); }
size_t round_up_256(size_t n) { return (n + 255) & ~size_t(255); }

// Runs of tensors copied back to back into device memory, each run starting on a 256-byte boundary.
using Runs = std::vector<std::vector<Tensor*>>;

size_t runs_bytes(const Runs& runs) {
  size_t n = 0;
  for (const auto& run : runs) {
    size_t r = 0;
    for (const Tensor* t : run) r += tensor_bytes(*t);
    n += round_up_256(r);
  }
  return n;
}

// Whether linears that read the same input can be stacked into one matrix of all their rows: all present,
// of one weight type and width, and with a bias each or none.
bool stackable(std::initializer_list<const Linear*> ls) {
  const Linear& a = **ls.begin();
  for (const Linear* l : ls)
    if (!l->present() || l->w.type != a.w.type || l->w.cols != a.w.cols || l->w.row_stride != a.w.row_stride ||
        l->b.empty() != a.b.empty() || (!l->b.empty() && (l->b.type != GGMLType::F32 || l->b.rows != 1)))
      return false;
  return true;
}

// A block's tensors as runs. On a device, q/k/v and gate/up (matrices that multiply the same input) are
// stacked, weights and biases each, so that each group runs as one matmul: a decode step on a GPU is
// bound by its launches and by how many weight bytes each launch keeps in flight, and three 4096-row
// GEMVs read the same bytes more slowly than one of 12288 rows. Linears of different types stay apart;
// every other tensor is a run of its own.
Runs layer_runs(Layer& L, bool* qkv, bool* gate_up) {
  *qkv = stackable({&L.wq, &L.wk, &L.wv});
  *gate_up = stackable({&L.w_gate, &L.w_up});
  Runs runs;
  std::vector<const Tensor*> taken;
  auto run = [&](std::vector<Tensor*> ts) {
    if (ts.front()->empty()) return;
    runs.push_back(ts);
    taken.insert(taken.end(), ts.begin(), ts.end());
  };
  if (*qkv) run({&L.wq.w, &L.wk.w, &L.wv.w}), run({&L.wq.b, &L.wk.b, &L.wv.b});
  if (*gate_up) run({&L.w_gate.w, &L.w_up.w}), run({&L.w_gate.b, &L.w_up.b});
  for (Tensor* t : L.tensors())
    if (!t->empty() && std::find(taken.begin(), taken.end(), t) == taken.end()) runs.push_back({t});
  return runs;
}

Runs head_runs(Head& h) {
  Runs runs;
  for (Tensor* t : h.tensors())
    if (!t->empty()) runs.push_back({t});
  return runs;
}

// Copies the runs' tensors into one new buffer on the executor's device and points them there.
void copy_runs(Executor& ex, const Runs& runs, std::vector<Buffer>& memory) {
  memory.emplace_back(ex.device(), runs_bytes(runs));
  uint8_t* dst = static_cast<uint8_t*>(memory.back().data());
  for (const auto& run : runs) {
    size_t n = 0;
    for (Tensor* t : run) {
      copy_between(ex, ex.device(), dst + n, Device::CPU, t->data, tensor_bytes(*t));
      t->data = dst + n;
      t->device = ex.device();
      t->panels = nullptr;
      t->panel_rows = 0;
      n += tensor_bytes(*t);
    }
    dst += round_up_256(n);
  }
}

// The linears of a run as one: the rows of all (contiguous in memory), and their biases side by side.
Linear stacked(std::initializer_list<const Linear*> ls) {
  Linear s = **ls.begin();
  for (auto it = ls.begin() + 1; it != ls.end(); ++it) {
    s.w.rows += (*it)->w.rows;
    if (!s.b.empty()) s.b.cols += (*it)->b.cols, s.b.row_stride += (*it)->b.row_stride;
  }
  return s;
}

Layer copy_to(Executor& ex, const Layer& layer, std::vector<Buffer>& memory) {
  Layer out = layer;
  bool qkv, gate_up;
  copy_runs(ex, layer_runs(out, &qkv, &gate_up), memory);
  if (qkv) out.wqkv = stacked({&out.wq, &out.wk, &out.wv}), out.wq = out.wk = out.wv = Linear{};
  if (gate_up) out.w_up = stacked({&out.w_gate, &out.w_up}), out.w_gate = Linear{};  // [gate; up], as ChatGLM2's
  return out;
}

Head copy_to(Executor& ex, const Head& head, std::vector<Buffer>& memory) {
  Head out = head;
  copy_runs(ex, head_runs(out), memory);
  return out;
}

}  // namespace

size_t Model::layer_bytes(int64_t layer) const {
  Layer L = decoder.layers.at(size_t(layer));
  bool qkv, gate_up;
  return runs_bytes(layer_runs(L, &qkv, &gate_up));
}
size_t Model::head_bytes() const {
  Head h = decoder.head;
  return runs_bytes(head_runs(h));
}

PositionBias position_bias(const ModelConfig& c, const Stack& s, bool bidirectional) {
  PositionBias b;
  if (s.rel_bias.empty()) return b;
  b.table = s.rel_bias.data();
  b.n_buckets = int(c.n_rel_buckets);
  b.bidirectional = bidirectional;
  return b;
}

void Model::offload(int n_gpu_layers) {
  PE_CHECK(gpu_.n_layers == 0, Error, "the model is already offloaded (", gpu_.n_layers, " layers)");
  PE_CHECK(n_gpu_layers == 0 || cfg_.spec.family != Family::EncoderDecoder, UnsupportedModelError, file_->path(),
           ": a ", cfg_.arch, " model (encoder-decoder) runs on the CPU only in this version of pyengine: load it "
           "with n_gpu_layers=0");
  const int n_layer = int(cfg_.n_layer);
  const int n = n_gpu_layers < 0 ? 0 : (n_gpu_layers > n_layer ? n_layer : n_gpu_layers);
  if (n == 0) return;
  GpuLayers g;
  g.executor = Executor::cuda();
  g.n_layers = n;
  g.head = n == n_layer;
  for (int l = n_layer - n; l < n_layer; l++) g.layers.push_back(copy_to(*g.executor, decoder.layers[size_t(l)], g.memory));
  if (g.head) g.head_weights = copy_to(*g.executor, decoder.head, g.memory);
  for (const Buffer& b : g.memory) g.bytes += b.size();
  g.executor->synchronize();
  gpu_ = std::move(g);
}

void Model::pack_cpu_weights(Executor& ex) const {
  std::call_once(packed_, [&] {
    // The weights of the matmuls that run on the CPU; logically const: only their panel copies are added.
    auto& self = const_cast<Model&>(*this);
    std::vector<Tensor*> cpu;
    const int n_cpu_layers = int(self.decoder.layers.size()) - gpu_.n_layers;
    auto add_layer = [&](Layer& layer) {
      for (Tensor* t : layer.tensors())
        if (t != &layer.prefix_k && t != &layer.prefix_v) cpu.push_back(t);  // the only non-matmul matrices
    };
    for (int l = 0; l < n_cpu_layers; l++) add_layer(self.decoder.layers[size_t(l)]);
    for (Layer& layer : self.encoder.layers) add_layer(layer);
    if (!gpu_.head)
      for (Tensor* t : self.decoder.head.tensors()) cpu.push_back(t);
    // Tensors sharing bytes (and shape) share a copy. All copies go in one buffer, so that it can use
    // huge pages.
    std::map<std::pair<const void*, size_t>, size_t> offset;  // (data, panel bytes) -> offset
    std::vector<Tensor*> packed;
    size_t total = 0;
    // Matrices only: a model's one-row float tensors are norms and biases, which no matmul reads.
    auto wanted = [](const Tensor& t) {
      return !t.panels && t.rows > 1 && cpu::can_pack_panels(t) && cpu::panel_rows_for_cpu(t) > 0;
    };
    for (Tensor* t : cpu) {
      if (!wanted(*t)) continue;
      const size_t bytes = cpu::panel_bytes(*t, cpu::panel_rows_for_cpu(*t));
      if (offset.emplace(std::pair{t->data, bytes}, total).second) {
        total += (bytes + 63) & ~size_t(63);
        packed.push_back(t);
      }
    }
    if (total == 0) return;
    panel_memory_ = Buffer::huge_pages(total);
    auto* base = static_cast<uint8_t*>(panel_memory_.data());
    // A few MiB of rows at a time, each chunk's file pages released once copied: the copy grows as the
    // file's pages go, and the peak stays a chunk above either (a whole embedding table at once was 40 MB
    // of SmolLM2 F16's peak RSS).
    constexpr size_t kChunkBytes = size_t(4) << 20;
    for (Tensor* t : packed) {
      const int r = cpu::panel_rows_for_cpu(*t);
      uint8_t* dst = base + offset.at({t->data, cpu::panel_bytes(*t, r)});
      const int64_t chunk = std::max<int64_t>(1, int64_t(kChunkBytes / (t->row_stride * size_t(r)))) * r;
      for (int64_t r0 = 0; r0 < t->rows; r0 += chunk) {
        const Tensor part = t->rows_view(r0, std::min(chunk, t->rows - r0));  // whole panels: r0 % r == 0
        cpu::pack_panels(ex, part, r, dst + size_t(r0) * t->row_stride);
        file_->release_pages(part.data, part.row_stride * size_t(part.rows));
      }
    }
    // Every matmul weight has a copy; so does an embedding table tied to the output (its lookups read
    // the output's copy, the file's pages having gone).
    auto attach = [&](Tensor& t) {
      if (t.empty() || !wanted(t)) return;
      const int r = cpu::panel_rows_for_cpu(t);
      const auto it = offset.find({t.data, cpu::panel_bytes(t, r)});
      if (it != offset.end()) t.panel_rows = r, t.panels = base + it->second;
    };
    for (Tensor* t : cpu) attach(*t);
    attach(self.tok_embd);
  });
}

RopeParams Model::rope(int64_t n_ctx, bool windowed) const {
  RopeParams p = windowed ? cfg_.rope_swa : cfg_.rope;
  // llama.cpp (llama_model::get_rope_factors) compares its n_ctx_seq, which it rounds up to a multiple
  // of 256; ours is the context as asked for. Both agree whenever the original context is a multiple
  // of 256 (Phi-3's 4096).
  if (!rope_long.empty() && !p.freq_factors) p.freq_factors = (n_ctx > cfg_.n_ctx_orig ? rope_long : rope_short).data();
  return p;
}

Linear Loader::linear(Model& m, const std::string& base, int64_t rows, int64_t cols, bool required) const {
  Linear l;
  l.w = matrix(base + ".weight", rows, cols, required);
  if (l.present()) l.b = m.keep(vec(base + ".bias", rows, false));
  return l;
}

Model::Model(const std::string& path, bool use_mmap) : file_(std::make_shared<GGUFFile>(path, use_mmap)) {
  cfg_ = read_config(*file_);
  const ModelConfig& c = cfg_;
  Loader ld(*file_);

  const GGUFTensorInfo* emb = ld.find("token_embd.weight", true);
  PE_CHECK(emb->ne.size() >= 2 && emb->ne[0] == c.n_embd, ModelFormatError, file_->path(),
           ": tensor 'token_embd.weight' has a row of ", emb->ne[0], " elements, expected embedding_length ", c.n_embd);
  cfg_.n_vocab = emb->ne[1];
  tok_embd = ld.matrix("token_embd.weight", cfg_.n_vocab, c.n_embd);

  Head& head = decoder.head;
  const bool lm = c.spec.family == Family::DecoderOnly;  // encoders end in hidden states: no LM head
  const bool enc_dec = c.spec.family == Family::EncoderDecoder;
  const std::string dec = c.spec.decoder_prefix, enc = c.spec.encoder_prefix;
  // A pre-norm stack ends in an output norm; a post-norm one (BERT, BART) in its last block's norm.
  auto load_output_norm = [&](Head& h, const std::string& prefix, bool required) {
    h.output_norm = keep(ld.vec(prefix + "output_norm.weight", c.n_embd, required && !c.spec.post_norm));
    if (c.spec.norm == NormType::Layer) h.output_norm_b = keep(ld.vec(prefix + "output_norm.bias", c.n_embd, false));
  };
  load_output_norm(head, dec, lm || enc_dec);
  if (enc_dec) load_output_norm(encoder.head, enc, true);
  if (lm || enc_dec) {
    head.output = ld.linear(*this, "output", cfg_.n_vocab, c.n_embd, false);
    if (!head.output.present()) {
      head.output.w = tok_embd;  // tied embeddings; a bias of its own (BART's final_logits_bias) all the same
      head.output.b = keep(ld.vec("output.bias", cfg_.n_vocab, false));
      // transformers' T5ForConditionalGeneration rescales before a tied LM head (llama.cpp's t5 does not)
      if (c.spec.tied_head_scale) head.output_scale = 1.f / std::sqrt(float(c.n_embd));
    }
  }
  // Each stack's input: "position_embd" / "token_embd_norm" (BERT, GPT-2), "enc." / "dec." ones (BART).
  auto load_input = [&](StackInput& in, const std::string& prefix) {
    if (c.spec.positions == Positions::Learned) {
      const std::string name = prefix + "position_embd.weight";
      const GGUFTensorInfo* pos = ld.find(name, true);
      const int64_t n_pos = pos->ne.size() >= 2 ? pos->ne[1] : 0;
      PE_CHECK(n_pos > 0 && n_pos <= (int64_t(1) << 24), ModelFormatError, file_->path(), ": tensor '", name,
               "' has ", n_pos, " positions");
      in.position_embd = ld.matrix(name, n_pos, c.n_embd);
      cfg_.n_ctx_train = std::min(cfg_.n_ctx_train, n_pos);  // no position beyond the table
    }
    if (c.spec.embedding_norm) {
      in.norm = keep(ld.vec(prefix + "token_embd_norm.weight", c.n_embd));
      in.norm_b = keep(ld.vec(prefix + "token_embd_norm.bias", c.n_embd, false));
    }
  };
  load_input(decoder.input, dec);
  if (enc_dec) load_input(encoder.input, enc);
  if (c.spec.positions == Positions::Learned) {
    if (const GGUFTensorInfo* tt = ld.find("token_types.weight", false)) {
      const int64_t n_types = tt->ne.size() >= 2 ? tt->ne[1] : 0;
      PE_CHECK(n_types > 0 && n_types <= 1024, ModelFormatError, file_->path(), ": tensor 'token_types.weight' has ",
               n_types, " types");
      Vec type0(size_t(c.n_embd));
      cpu::dequantize_row(ld.matrix("token_types.weight", n_types, c.n_embd), 0, type0.data());
      token_type = keep(std::move(type0));
    }
  }

  if (const GGUFTensorInfo* rf = ld.find("rope_freqs.weight", false)) {
    (void)rf;
    rope_freqs = ld.vec("rope_freqs.weight", c.rope.n_dims / 2);
    for (float v : rope_freqs)
      PE_CHECK(std::isfinite(v) && v > 0, ModelFormatError, file_->path(), ": tensor 'rope_freqs.weight' holds ", v,
               ": RoPE frequency factors must be positive finite numbers");
    cfg_.rope.freq_factors = cfg_.rope_swa.freq_factors = rope_freqs.data();
  }
  // LongRoPE (Phi-3 128k): two sets of per-pair frequency divisors, chosen per context (rope() above);
  // rope_freqs, when a file has both, wins as in llama.cpp.
  const GGUFTensorInfo* rf_long = ld.find("rope_factors_long.weight", false);
  const GGUFTensorInfo* rf_short = ld.find("rope_factors_short.weight", false);
  if (rf_long || rf_short) {
    PE_CHECK(rf_long && rf_short, ModelFormatError, file_->path(), ": tensor '",
             rf_long ? "rope_factors_short.weight" : "rope_factors_long.weight", "' is missing (LongRoPE needs both ",
             "rope_factors_long.weight and rope_factors_short.weight)");
    for (auto [name, factors] : {std::pair{"rope_factors_long.weight", &rope_long},
                                 std::pair{"rope_factors_short.weight", &rope_short}}) {
      *factors = ld.vec(name, c.rope.n_dims / 2);
      for (float v : *factors)
        PE_CHECK(std::isfinite(v) && v > 0, ModelFormatError, file_->path(), ": tensor '", name, "' holds ", v,
                 ": RoPE frequency factors must be positive finite numbers");
    }
  }

  const int64_t q_dim = c.n_head * c.head_dim, kv_dim = c.n_head_kv * c.head_dim;
  // The blocks of one stack: "blk.N." (a decoder-only or encoder-only model), "enc.blk.N." / "dec.blk.N.".
  auto load_stack = [&](Stack& stack, const std::string& prefix, int64_t n_layer, bool cross) {
  stack.layers.resize(size_t(n_layer));
  for (int64_t l = 0; l < n_layer; l++) {
    Layer& L = stack.layers[size_t(l)];
    const std::string b = prefix + "blk." + std::to_string(l) + ".";
    const std::string an = b + c.spec.attn_norm_name, fn = b + c.spec.ffn_norm_name;
    L.attn_norm = keep(ld.vec(an + ".weight", c.n_embd));
    if (c.spec.norm == NormType::Layer) L.attn_norm_b = keep(ld.vec(an + ".bias", c.n_embd, false));
    L.wqkv = ld.linear(*this, b + "attn_qkv", q_dim + 2 * kv_dim, c.n_embd, false);
    if (!L.wqkv.present()) {
      L.wq = ld.linear(*this, b + "attn_q", q_dim, c.n_embd);
      L.wk = ld.linear(*this, b + "attn_k", kv_dim, c.n_embd);
      L.wv = ld.linear(*this, b + "attn_v", kv_dim, c.n_embd);
    }
    L.wo = ld.linear(*this, b + c.spec.attn_out_name, c.n_embd, q_dim);
    if (cross) {
      L.cross_norm = keep(ld.vec(b + "cross_attn_norm.weight", c.n_embd));
      if (c.spec.norm == NormType::Layer) L.cross_norm_b = keep(ld.vec(b + "cross_attn_norm.bias", c.n_embd, false));
      L.cross_q = ld.linear(*this, b + "cross_attn_q", q_dim, c.n_embd);
      L.cross_k = ld.linear(*this, b + "cross_attn_k", kv_dim, c.n_embd);
      L.cross_v = ld.linear(*this, b + "cross_attn_v", kv_dim, c.n_embd);
      L.cross_o = ld.linear(*this, b + "cross_attn_o", c.n_embd, q_dim);
    }
    L.attn_q_norm = keep(ld.vec(b + "attn_q_norm.weight", c.head_dim, false));
    L.attn_k_norm = keep(ld.vec(b + "attn_k_norm.weight", c.head_dim, false));
    L.attn_post_norm = keep(ld.vec(b + "post_attention_norm.weight", c.n_embd, false));
    L.ffn_post_norm = keep(ld.vec(b + "post_ffw_norm.weight", c.n_embd, false));
    L.ffn_norm = keep(ld.vec(fn + ".weight", c.n_embd));
    if (c.spec.norm == NormType::Layer) L.ffn_norm_b = keep(ld.vec(fn + ".bias", c.n_embd, false));
    // A mixture-of-experts block has a router; without one a block of a MoE model is dense (pyengine
    // writes Qwen3-MoE's mlp_only_layers so; llama.cpp's qwen3moe has none).
    if (c.spec.moe && (ld.find(b + "ffn_gate_inp.weight", false) || ld.find(b + "ffn_gate_exps.weight", false))) {
      const char* in_dims = "embedding_length, expert_feed_forward_length";
      L.experts.router = ld.matrix(b + "ffn_gate_inp.weight", c.n_expert, c.n_embd);
      L.experts.gate = ld.experts(b + "ffn_gate_exps.weight", c.n_expert, c.n_ff_exp, c.n_embd, in_dims);
      L.experts.up = ld.experts(b + "ffn_up_exps.weight", c.n_expert, c.n_ff_exp, c.n_embd, in_dims);
      L.experts.down = ld.experts(b + "ffn_down_exps.weight", c.n_expert, c.n_embd, c.n_ff_exp,
                                  "expert_feed_forward_length, embedding_length");
    } else {
      if (cfg_.spec.gated_ffn && !c.spec.fused_gate_up) L.w_gate = ld.linear(*this, b + "ffn_gate", c.n_ff, c.n_embd);
      L.w_up = ld.linear(*this, b + "ffn_up", c.spec.fused_gate_up ? 2 * c.n_ff : c.n_ff, c.n_embd);
      L.w_down = ld.linear(*this, b + "ffn_down", c.n_embd, c.n_ff);
    }
    if (c.spec.block_biases) {
      std::vector<std::string> biased = {"attn_q", "attn_k", "attn_v", c.spec.attn_out_name, c.spec.attn_norm_name,
                                         "ffn_up", "ffn_down", c.spec.ffn_norm_name};
      if (cross) biased.insert(biased.end(), {"cross_attn_q", "cross_attn_k", "cross_attn_v", "cross_attn_o", "cross_attn_norm"});
      for (const std::string& name : biased) ld.find(b + name + ".bias", true);
    }
    if (c.prefix_length > 0) {
      L.prefix_k = keep(ld.float_matrix(b + "prefix_k", c.prefix_length, kv_dim), c.prefix_length);
      L.prefix_v = keep(ld.float_matrix(b + "prefix_v", c.prefix_length, kv_dim), c.prefix_length);
    } else {
      PE_CHECK(!ld.find(b + "prefix_k", false) && !ld.find(b + "prefix_v", false), ModelFormatError, file_->path(),
               ": tensors '", b, "prefix_k/v' (a P-Tuning v2 prefix) without metadata key '", c.arch,
               ".prefix_length'");
    }
  }
  if (c.spec.positions == Positions::RelativeBuckets) {
    // ggml shape {n_head, n_buckets} (HF's Embedding(n_buckets, n_heads)): transposed to a row per head
    const Vec t = ld.float_matrix(prefix + "blk.0.attn_rel_b.weight", c.n_rel_buckets, c.n_head);
    stack.rel_bias.resize(t.size());
    for (int64_t k = 0; k < c.n_rel_buckets; k++)
      for (int64_t h = 0; h < c.n_head; h++) stack.rel_bias[size_t(h * c.n_rel_buckets + k)] = t[size_t(k * c.n_head + h)];
  }
  };
  if (c.spec.ffn_from_tensors) {  // llama.cpp's t5: the FFN's form follows the file
    cfg_.spec.gated_ffn = ld.find((enc_dec ? enc : dec) + "blk.0.ffn_gate.weight", false) != nullptr;
    cfg_.spec.act = cfg_.spec.gated_ffn ? c.spec.act_gated : c.spec.act;
  }
  load_stack(decoder, dec, c.n_layer, enc_dec);
  if (enc_dec) load_stack(encoder, enc, c.n_enc_layer, false);
  file_->check_unchanged();  // the 1-D parameters were copied out of the mapping
}

}  // namespace pe
