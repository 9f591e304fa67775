// AudioWorklet: microphone frames (float, the AudioContext's rate) -> 16-bit PCM at the target rate, posted to the
// page in 100 ms chunks. When the context runs at another rate, samples are averaged over each output period (a box
// filter: enough against aliasing of speech for transcription, and no dependency).
class PcmCapture extends AudioWorkletProcessor {
  constructor(options) {
    super();
    this.target = options.processorOptions.targetRate;
    this.ratio = sampleRate / this.target;
    this.phase = 0;
    this.sum = 0;
    this.count = 0;
    this.size = Math.round(this.target / 10);
    this.buffer = new Int16Array(this.size);
    this.fill = 0;
  }

  push(value) {
    const v = Math.max(-1, Math.min(1, value));
    this.buffer[this.fill++] = v < 0 ? Math.round(v * 32768) : Math.round(v * 32767);
    if (this.fill === this.size) {
      this.port.postMessage(this.buffer.buffer, [this.buffer.buffer]);
      this.buffer = new Int16Array(this.size);
      this.fill = 0;
    }
  }

  process(inputs) {
    const input = inputs[0];
    if (!input || input.length === 0) return true;
    const frames = input[0].length;
    for (let i = 0; i < frames; i++) {
      let s = 0;
      for (let c = 0; c < input.length; c++) s += input[c][i];
      s /= input.length;
      if (this.ratio === 1) {
        this.push(s);
        continue;
      }
      this.sum += s;
      this.count += 1;
      this.phase += 1;
      if (this.phase >= this.ratio) {
        this.phase -= this.ratio;
        this.push(this.sum / this.count);
        this.sum = 0;
        this.count = 0;
      }
    }
    return true;
  }
}

registerProcessor("pcm-capture", PcmCapture);
