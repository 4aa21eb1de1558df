// The early-exit batch scheduler of budgeted inference (continuous batching of GFNet steps).
//
// The scheduler owns the bookkeeping; Python only runs the networks. A fixed table of `capacity`
// slots holds images that are somewhere in their 0..T-1 steps; each slot's state rows (image,
// classifier and policy hidden states, feature map) live at the same row of preallocated device
// tensors, so a step is: gather the rows of the chosen slots, run the step at a fixed batch shape,
// scatter the new state back, report the max probabilities. Exited images free their slots and new
// images from the input stream take them (refill), so every step runs on a full batch of B images
// until the stream ends.
//
// Policy of next_batch():
//   1. a step with >= B ready images: run B of them, the deepest such step first (it finishes images
//      and frees slots soonest, which bounds the working set), oldest images first within a step;
//   2. otherwise, while the stream is open and slots are free: ask for B - ready[0] new images (the
//      glance batch becomes full). With capacity >= T * (B - 1) + 1 (the default T * B) this is always
//      possible: if no step had B ready, at most T * (B - 1) slots would be busy;
//   3. otherwise (stream ended, or a smaller capacity is full) run a partial batch: after the end of
//      the stream the shallowest non-empty step (its survivors join the next step's queue, so the tail
//      takes at most about T partial batches), with a full table the deepest (it frees slots).
// Results (prediction, exit step) are recorded per stream id, so they come back in stream order.
#include <algorithm>
#include <deque>
#include <string>
#include <tuple>
#include <vector>

#include "gfnet.h"

namespace {

constexpr int64_t kAdmit = -1;  // next_batch()'s step when the caller must admit images (or end the stream)
constexpr int64_t kFree = -1;   // slot_stream_id_ of a free slot

class EarlyExitScheduler {
 public:
  EarlyExitScheduler(int64_t capacity, int64_t batch_size, const at::Tensor& thresholds) {
    TORCH_CHECK(batch_size >= 1, "EarlyExitScheduler: batch_size must be >= 1, got ", batch_size);
    TORCH_CHECK(capacity >= batch_size, "EarlyExitScheduler: capacity (", capacity,
                ") must be >= batch_size (", batch_size, ")");
    TORCH_CHECK(thresholds.dim() == 1 && thresholds.numel() >= 1,
                "EarlyExitScheduler: thresholds must be a 1-D tensor with one value per step (T >= 1), got shape ",
                thresholds.sizes());
    TORCH_CHECK(thresholds.is_floating_point(), "EarlyExitScheduler: thresholds must be floating point, got ",
                thresholds.scalar_type());
    auto host = thresholds.detach().to(at::kCPU, at::kDouble).contiguous();
    thresholds_.assign(host.data_ptr<double>(), host.data_ptr<double>() + host.numel());
    capacity_ = capacity;
    batch_size_ = batch_size;
    num_steps_ = static_cast<int64_t>(thresholds_.size());
    slot_stream_id_.assign(capacity, kFree);
    slot_step_.assign(capacity, 0);
    ready_.resize(num_steps_);
    step_images_.assign(num_steps_, 0);
    step_batches_.assign(num_steps_, 0);
    free_slots_.reserve(capacity);
    // a stack popped from the back: slots 0, 1, 2, ... are handed out first
    for (int64_t s = capacity - 1; s >= 0; --s) free_slots_.push_back(s);
  }

  // Free slots for `count` new images, with the stream ids they get (0, 1, 2, ... in admission order).
  std::tuple<at::Tensor, at::Tensor> admit(int64_t count) {
    TORCH_CHECK(!stream_ended_, "EarlyExitScheduler.admit: the stream was ended; no more images can be admitted");
    TORCH_CHECK(!in_flight_, "EarlyExitScheduler.admit: report() the batch of step ", in_flight_step_,
                " before admitting images");
    TORCH_CHECK(count >= 0 && count <= num_free(), "EarlyExitScheduler.admit: asked for ", count,
                " slots but ", num_free(), " are free");
    auto slots = at::empty({count}, at::kLong);
    auto ids = at::empty({count}, at::kLong);
    auto* slot_ptr = slots.data_ptr<int64_t>();
    auto* id_ptr = ids.data_ptr<int64_t>();
    for (int64_t i = 0; i < count; ++i) {
      const int64_t slot = free_slots_.back();
      free_slots_.pop_back();
      const int64_t id = static_cast<int64_t>(preds_.size());
      slot_stream_id_[slot] = id;
      slot_step_[slot] = 0;
      ready_[0].push_back(slot);
      preds_.push_back(-1);
      exit_steps_.push_back(-1);
      slot_ptr[i] = slot;
      id_ptr[i] = id;
    }
    return {slots, ids};
  }

  // No more images will come: from now on partial batches are run to drain the table.
  void end_stream() { stream_ended_ = true; }

  // The next step to run and its slots (see the policy above); (-1, empty) asks for admit(wanted())
  // or end_stream() first.
  std::tuple<int64_t, at::Tensor> next_batch() {
    TORCH_CHECK(!in_flight_, "EarlyExitScheduler.next_batch: report() the batch of step ", in_flight_step_,
                " before asking for the next one");
    TORCH_CHECK(!done(), "EarlyExitScheduler.next_batch: every admitted image has exited and the stream has ended");
    int64_t step = -1;
    for (int64_t k = num_steps_ - 1; k >= 0; --k) {
      if (static_cast<int64_t>(ready_[k].size()) >= batch_size_) {
        step = k;
        break;
      }
    }
    if (step < 0 && !stream_ended_ && num_free() > 0) {
      wanted_ = std::min<int64_t>(num_free(), batch_size_ - static_cast<int64_t>(ready_[0].size()));
      return {kAdmit, at::empty({0}, at::kLong)};
    }
    if (step < 0) {
      if (stream_ended_) {
        for (int64_t k = 0; k < num_steps_ && step < 0; ++k)
          if (!ready_[k].empty()) step = k;
      } else {
        for (int64_t k = num_steps_ - 1; k >= 0 && step < 0; --k)
          if (!ready_[k].empty()) step = k;
      }
    }
    TORCH_CHECK(step >= 0, "EarlyExitScheduler.next_batch: no image is ready although ", num_active(),
                " are active (internal error)");
    auto& queue = ready_[step];
    const int64_t n = std::min<int64_t>(batch_size_, static_cast<int64_t>(queue.size()));
    auto slots = at::empty({n}, at::kLong);
    auto* slot_ptr = slots.data_ptr<int64_t>();
    for (int64_t i = 0; i < n; ++i) {
      slot_ptr[i] = queue.front();
      queue.pop_front();
    }
    in_flight_ = true;
    in_flight_step_ = step;
    in_flight_slots_.assign(slot_ptr, slot_ptr + n);
    step_batches_[step] += 1;
    step_images_[step] += n;
    if (n < batch_size_) partial_batches_ += 1;
    return {step, slots};
  }

  // How many images next_batch() asked for when it returned -1.
  int64_t wanted() const { return wanted_; }

  // The outcome of running `step` on `slots` (exactly the last next_batch()): images whose max
  // probability reaches thresholds[step] (all of them at the last step) exit with their prediction
  // and free their slot; the others move on to step + 1. Returns the exit mask Tensor[n] bool.
  at::Tensor report(int64_t step, const at::Tensor& slots, const at::Tensor& max_probs, const at::Tensor& preds) {
    TORCH_CHECK(in_flight_, "EarlyExitScheduler.report: no batch is in flight (call next_batch() first)");
    TORCH_CHECK(step == in_flight_step_, "EarlyExitScheduler.report: the batch in flight is of step ",
                in_flight_step_, ", got step ", step);
    TORCH_CHECK(slots.dim() == 1 && slots.scalar_type() == at::kLong,
                "EarlyExitScheduler.report: slots must be a 1-D int64 tensor, got ", slots.scalar_type(),
                " of shape ", slots.sizes());
    const int64_t n = slots.numel();
    TORCH_CHECK(n == static_cast<int64_t>(in_flight_slots_.size()), "EarlyExitScheduler.report: got ", n,
                " slots, the batch in flight has ", in_flight_slots_.size());
    TORCH_CHECK(max_probs.dim() == 1 && max_probs.numel() == n && max_probs.is_floating_point(),
                "EarlyExitScheduler.report: max_probs must be a floating-point Tensor[", n, "], got ",
                max_probs.scalar_type(), " of shape ", max_probs.sizes());
    TORCH_CHECK(preds.dim() == 1 && preds.numel() == n && !preds.is_floating_point(),
                "EarlyExitScheduler.report: preds must be an integer Tensor[", n, "], got ", preds.scalar_type(),
                " of shape ", preds.sizes());
    auto slots_host = slots.to(at::kCPU).contiguous();
    // float32 -> double is exact, so the test below equals the float32 comparison made post hoc
    auto probs_host = max_probs.detach().to(at::kCPU, at::kDouble).contiguous();
    auto preds_host = preds.to(at::kCPU, at::kLong).contiguous();
    const auto* slot_ptr = slots_host.data_ptr<int64_t>();
    for (int64_t i = 0; i < n; ++i)
      TORCH_CHECK(slot_ptr[i] == in_flight_slots_[i], "EarlyExitScheduler.report: slot ", i, " is ", slot_ptr[i],
                  ", next_batch() gave ", in_flight_slots_[i]);
    const auto* prob_ptr = probs_host.data_ptr<double>();
    const auto* pred_ptr = preds_host.data_ptr<int64_t>();
    auto exited = at::empty({n}, at::kBool);
    auto* exited_ptr = exited.data_ptr<bool>();
    const bool last_step = step == num_steps_ - 1;
    const double threshold = thresholds_[step];
    for (int64_t i = 0; i < n; ++i) {
      const int64_t slot = slot_ptr[i];
      const bool leaves = last_step || prob_ptr[i] >= threshold;
      exited_ptr[i] = leaves;
      if (leaves) {
        const int64_t id = slot_stream_id_[slot];
        preds_[id] = pred_ptr[i];
        exit_steps_[id] = step;
        slot_stream_id_[slot] = kFree;
        free_slots_.push_back(slot);
        finished_ += 1;
      } else {
        slot_step_[slot] = step + 1;
        ready_[step + 1].push_back(slot);
      }
    }
    in_flight_ = false;
    in_flight_slots_.clear();
    return exited;
  }

  // The stream ended and every admitted image has exited.
  bool done() const { return stream_ended_ && num_active() == 0 && !in_flight_; }

  // (preds, exit_steps) Tensor[num_admitted] int64 in stream order; -1 for images not finished yet.
  std::tuple<at::Tensor, at::Tensor> results() const {
    const int64_t n = static_cast<int64_t>(preds_.size());
    auto preds = at::empty({n}, at::kLong);
    auto steps = at::empty({n}, at::kLong);
    std::copy(preds_.begin(), preds_.end(), preds.data_ptr<int64_t>());
    std::copy(exit_steps_.begin(), exit_steps_.end(), steps.data_ptr<int64_t>());
    return {preds, steps};
  }

  // Results not yet popped whose stream ids form a finished prefix: (first stream id, preds, exit_steps),
  // for consumers that stream results out in input order.
  std::tuple<int64_t, at::Tensor, at::Tensor> pop_finished() {
    const int64_t first = popped_;
    int64_t end = popped_;
    const int64_t n = static_cast<int64_t>(preds_.size());
    while (end < n && exit_steps_[end] >= 0) ++end;
    auto preds = at::empty({end - first}, at::kLong);
    auto steps = at::empty({end - first}, at::kLong);
    std::copy(preds_.begin() + first, preds_.begin() + end, preds.data_ptr<int64_t>());
    std::copy(exit_steps_.begin() + first, exit_steps_.begin() + end, steps.data_ptr<int64_t>());
    popped_ = end;
    return {first, preds, steps};
  }

  int64_t num_free() const { return static_cast<int64_t>(free_slots_.size()); }
  int64_t num_active() const { return capacity_ - num_free(); }
  int64_t num_admitted() const { return static_cast<int64_t>(preds_.size()); }
  int64_t num_finished() const { return finished_; }
  int64_t capacity() const { return capacity_; }
  int64_t batch_size() const { return batch_size_; }
  int64_t num_steps() const { return num_steps_; }
  bool stream_ended() const { return stream_ended_; }
  std::vector<double> thresholds() const { return thresholds_; }
  std::vector<int64_t> ready_counts() const {
    std::vector<int64_t> counts;
    for (const auto& q : ready_) counts.push_back(static_cast<int64_t>(q.size()));
    return counts;
  }
  std::vector<int64_t> step_images() const { return step_images_; }
  std::vector<int64_t> step_batches() const { return step_batches_; }
  int64_t partial_batches() const { return partial_batches_; }

  std::string repr() const {
    std::string s = "EarlyExitScheduler(capacity=" + std::to_string(capacity_) +
                    ", batch_size=" + std::to_string(batch_size_) + ", T=" + std::to_string(num_steps_) +
                    ", admitted=" + std::to_string(num_admitted()) + ", finished=" + std::to_string(finished_) +
                    ", ready=[";
    for (int64_t k = 0; k < num_steps_; ++k)
      s += (k ? ", " : "") + std::to_string(ready_[k].size());
    return s + "], stream_ended=" + (stream_ended_ ? "True" : "False") + ")";
  }

 private:
  int64_t capacity_ = 0, batch_size_ = 0, num_steps_ = 0;
  std::vector<double> thresholds_;
  std::vector<int64_t> slot_stream_id_;  // stream id of the image in each slot, kFree if none
  std::vector<int64_t> slot_step_;       // the next step each busy slot runs
  std::vector<int64_t> free_slots_;
  std::vector<std::deque<int64_t>> ready_;  // per step: slots waiting to run it, oldest first
  std::vector<int64_t> preds_, exit_steps_;  // per stream id
  int64_t finished_ = 0, popped_ = 0, wanted_ = 0, partial_batches_ = 0;
  std::vector<int64_t> step_images_, step_batches_;
  bool stream_ended_ = false;
  bool in_flight_ = false;
  int64_t in_flight_step_ = -1;
  std::vector<int64_t> in_flight_slots_;
};

}  // namespace

void register_scheduler(pybind11::module_& m) {
  namespace py = pybind11;
  py::class_<EarlyExitScheduler>(m, "EarlyExitScheduler",
                                 "Slot table and policy of budgeted inference with continuous batching "
                                 "(see csrc/scheduler.cpp and gfnet.engine)")
      .def(py::init<int64_t, int64_t, const at::Tensor&>(), py::arg("capacity"), py::arg("batch_size"),
           py::arg("thresholds"))
      .def_readonly_static("ADMIT", &kAdmit)
      .def("admit", &EarlyExitScheduler::admit, py::arg("count"),
           "Free slots for `count` new images: (slots Tensor[count] int64, stream_ids Tensor[count] int64)")
      .def("end_stream", &EarlyExitScheduler::end_stream, "No more images will be admitted")
      .def("next_batch", &EarlyExitScheduler::next_batch,
           "(step, slots Tensor[n] int64) to run next; step == ADMIT (-1) asks for admit(wanted()) or end_stream()")
      .def("wanted", &EarlyExitScheduler::wanted, "Images asked for by the last next_batch() that returned ADMIT")
      .def("report", &EarlyExitScheduler::report, py::arg("step"), py::arg("slots"), py::arg("max_probs"),
           py::arg("preds"), "Apply the step's threshold; returns the exit mask Tensor[n] bool")
      .def("done", &EarlyExitScheduler::done)
      .def("results", &EarlyExitScheduler::results,
           "(preds, exit_steps) Tensor[num_admitted] int64 in stream order (-1 where unfinished)")
      .def("pop_finished", &EarlyExitScheduler::pop_finished,
           "(first_stream_id, preds, exit_steps) of the finished prefix not popped yet")
      .def_property_readonly("num_free", &EarlyExitScheduler::num_free)
      .def_property_readonly("num_active", &EarlyExitScheduler::num_active)
      .def_property_readonly("num_admitted", &EarlyExitScheduler::num_admitted)
      .def_property_readonly("num_finished", &EarlyExitScheduler::num_finished)
      .def_property_readonly("capacity", &EarlyExitScheduler::capacity)
      .def_property_readonly("batch_size", &EarlyExitScheduler::batch_size)
      .def_property_readonly("num_steps", &EarlyExitScheduler::num_steps)
      .def_property_readonly("stream_ended", &EarlyExitScheduler::stream_ended)
      .def_property_readonly("thresholds", &EarlyExitScheduler::thresholds)
      .def_property_readonly("ready_counts", &EarlyExitScheduler::ready_counts)
      .def_property_readonly("step_images", &EarlyExitScheduler::step_images,
                             "Images run per step so far (partial batches count their real images)")
      .def_property_readonly("step_batches", &EarlyExitScheduler::step_batches)
      .def_property_readonly("partial_batches", &EarlyExitScheduler::partial_batches)
      .def("__repr__", &EarlyExitScheduler::repr);
}
