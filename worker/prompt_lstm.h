/* prompt_lstm.h — P-tuning's LSTM prompt encoder core (finetune.prompt.encoder: lstm): torch.nn.LSTM with
 * ST_PLSTM_LAYERS layers, bidirectional, batch of one sequence of the V virtual-token embeddings, as peft's
 * PromptEncoder builds it (encoder_num_layers 2, encoder_dropout 0). Its 16 weights come in torch's
 * named_parameters order: per layer l and direction (forward, reverse): weight_ih [4H, in], weight_hh
 * [4H, H], bias_ih [4H], bias_hh [4H] (gates i, f, g, o); in = C for layer 0, 2H after. The output is
 * [V, 2H] (forward and reverse hidden states side by side). worker/prompt.c puts the MLP head after it.
 *
 * Memory: st_plstm_init allocates the saved activations (freed by st_plstm_free). Host memory. */
#ifndef ST_PROMPT_LSTM_H
#define ST_PROMPT_LSTM_H

#define ST_PLSTM_LAYERS 2

typedef struct st_plstm st_plstm;

int st_plstm_init(st_plstm **out, int V, int C, int H);
void st_plstm_free(st_plstm *s);

/* x [V, C] -> out [V, 2H]; keeps what backward needs. */
void st_plstm_forward(st_plstm *s, const float *x, const float *const w[4 * 2 * ST_PLSTM_LAYERS], float *out);

/* From dout [V, 2H]: g[k] += the weights' gradients (g[k] NULL: not wanted), dx [V, C] += the input's. */
void st_plstm_backward(st_plstm *s, const float *x, const float *const w[4 * 2 * ST_PLSTM_LAYERS],
                       float *const g[4 * 2 * ST_PLSTM_LAYERS], const float *dout, float *dx);

#endif
